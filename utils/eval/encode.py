"""Encoding a captioned set once and scoring retrieval: the one path used by eval.py and during training."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.data.pictures import ImagePipeline
from utils.device import autocast
from utils.errors import UserError
from utils.metrics import retrieval_metrics


def caption_index(entries: Sequence[dict]) -> tuple[list[str], list[int], list[list[int]]]:
    """(all captions in order, txt2img, img2txt) for the original's multi-caption retrieval."""
    captions, txt2img, img2txt = [], [], []
    for image_id, entry in enumerate(entries):
        img2txt.append(list(range(len(captions), len(captions) + len(entry["caption"]))))
        for caption in entry["caption"]:
            captions.append(caption)
            txt2img.append(image_id)
    return captions, txt2img, img2txt


def encode_images(pipeline: ImagePipeline, entries: Sequence[dict], root: str | Path, batch_size: int,
                  threads: int | None, progress: bool = True) -> torch.Tensor:
    """Unit features of the images of `entries`, on the pipeline's device. The set was checked before (preflight):
    an image unreadable now (changed since) stops the run with one line naming it."""
    paths = [Path(root) / e["image"] for e in entries]
    with tqdm(total=len(paths), desc="images", disable=not progress, leave=False) as bar:
        encoding = pipeline.encode(paths, batch_size, threads, progress=bar.update)
        features, _ = encoding.all()
    if encoding.unreadable:
        name, why = encoding.unreadable[0]
        more = f" (and {len(encoding.unreadable) - 1} more images of the set)" if len(encoding.unreadable) > 1 else ""
        raise UserError(f"{name} is unreadable ({why}){more}, though it was readable when the run began; fix or "
                        "remove it and run again")
    return features


@torch.no_grad()
def encode_captions(model, captions: Sequence[str], tokenizer: Callable, batch_size: int, device: torch.device,
                    dtype: torch.dtype = torch.float32, progress: bool = True) -> torch.Tensor:
    # A caption that appears more than once (short captions of a shared vocabulary often do) is encoded once.
    unique = list(dict.fromkeys(captions))
    tokens = tokenizer(unique)
    # Batches of similar length trim almost no padding away in the text tower: sort by token count.
    order = torch.argsort((tokens != 0).sum(dim=1), stable=True)
    features = torch.empty(len(unique), model.config.embed_dim)
    with autocast(device, dtype):
        for start in tqdm(range(0, len(unique), batch_size), desc="captions", disable=not progress, leave=False):
            rows = order[start:start + batch_size]
            features[rows] = F.normalize(model.encode_text(tokens[rows].to(device)).float(), dim=-1).cpu()
    row_of = {caption: row for row, caption in enumerate(unique)}
    return features[torch.tensor([row_of[caption] for caption in captions], dtype=torch.long)]


def encode_set(model, pipeline: ImagePipeline, entries: Sequence[dict], root: str | Path, tokenizer: Callable,
               batch_size: int, threads: int | None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised features of every image (through `pipeline`, whose image tower is `model`'s) and every caption
    of `entries`, each encoded once, in the pipeline's precision."""
    was_training = model.training
    model.eval()
    captions, _, _ = caption_index(entries)
    image_features = encode_images(pipeline, entries, root, batch_size, threads, progress)
    text_features = encode_captions(model, captions, tokenizer, batch_size, pipeline.device, pipeline.dtype, progress)
    model.train(was_training)
    return image_features, text_features


def score(entries: Sequence[dict], image_features: torch.Tensor, text_features: torch.Tensor,
          device: torch.device | None = None) -> dict[str, float]:
    _, txt2img, img2txt = caption_index(entries)
    return retrieval_metrics(image_features, text_features, txt2img, img2txt, device=device)


def evaluate(model, pipeline: ImagePipeline, entries: Sequence[dict], root: str | Path, tokenizer: Callable,
             batch_size: int, threads: int | None, progress: bool = True) -> dict[str, float]:
    """The original's recall dict (plus ranks) for image<->text retrieval over `entries`."""
    features = encode_set(model, pipeline, entries, root, tokenizer, batch_size, threads, progress)
    return score(entries, *features, device=pipeline.device)
