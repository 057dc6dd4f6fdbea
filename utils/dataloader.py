"""The original repo's JSON caption datasets, with randomness that depends only on (seed, epoch, index)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

from utils.data.images import open_image
from utils.data.pictures import decode_sides
from utils.errors import UserError


def read_json_list(json_path: str | Path) -> list:
    json_path = Path(json_path)
    if not json_path.is_file():
        raise UserError(f"annotation file {json_path} does not exist; check datasets_*_json_path")
    try:
        entries = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{json_path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{json_path} is not UTF-8 text ({e}); save it as UTF-8") from e
    if not isinstance(entries, list):
        raise UserError(f"{json_path} must hold a JSON list of {{\"image\": ..., \"caption\": [...]}} entries, "
                        f"not a {type(entries).__name__}")
    return entries


def entry_problem(entry) -> str | None:
    """Why an annotation entry is unusable, or None."""
    if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
        return f"needs both \"image\" and \"caption\" keys, got {str(entry)[:80]}"
    if not isinstance(entry["image"], str) or not entry["image"]:
        return "\"image\" must be a relative path string"
    captions = [entry["caption"]] if isinstance(entry["caption"], str) else entry["caption"]
    if not isinstance(captions, list) or not captions:
        return "\"caption\" must be a string or a non-empty list of strings"
    if not all(isinstance(c, str) for c in captions):
        return f"every caption must be text, got {str(captions)[:80]}"
    return None


def normalise(entry: dict) -> dict:
    """A caption given as one string is one caption; a backslash in the image path is a separator, as in
    JSON written on Windows ("images\\001.jpg"), on every platform."""
    captions = entry["caption"]
    return {"image": entry["image"].replace("\\", "/"),
            "caption": [captions] if isinstance(captions, str) else list(captions)}


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


class CaptionDataset(Dataset):
    """Training pairs: one image and one of its captions, chosen afresh each epoch, through a transform of
    the pair (utils/data/augment.CaptionAugment), so that augmentation can keep the caption true.

    Indexed by (epoch, index), as EpochSampler yields them: persistent workers keep their own copy of
    the dataset, so the epoch travels with each index rather than being set on the dataset. JPEGs are decoded
    only as large as the transform needs (its decode_sides()); fast_decode=False decodes in full.
    """

    def __init__(self, entries: Sequence[dict], root: str | Path,
                 transform: Callable[[Image.Image, str], tuple[torch.Tensor, str]], tokenizer: Callable,
                 seed: int = 0, fast_decode: bool = True):
        self.entries, self.root = entries, Path(root)
        self.transform, self.tokenizer = transform, tokenizer
        self.seed, self.sides = seed, decode_sides(transform) if fast_decode else None

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = item
        entry = self.entries[index]
        rng = sample_rng(self.seed, epoch, index)
        caption = entry["caption"][rng.integers(len(entry["caption"]))]
        image = open_image(self.root / entry["image"], self.sides)
        # torchvision's random transforms draw from torch's global generator: seed it per sample, locally.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2 ** 63)))
            pixels, caption = self.transform(image, caption)
        return pixels, self.tokenizer(caption)[0]


class EpochSampler(DistributedSampler):
    """DistributedSampler (also for one process) that yields (epoch, index) and can resume mid-epoch.

    Rank r's k-th batch of b holds positions r, r+N, ... of the shuffled order, so the N local batches
    together are exactly global positions [k*b*N, (k+1)*b*N): N processes with batch b see the same
    batches as one process with batch b*N, and skipping k local batches skips k global ones.
    """

    def __init__(self, dataset: Dataset, local_batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.local_batch_size = local_batch_size
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_batch = start_batch

    def batches_per_epoch(self) -> int:
        return self.num_samples // self.local_batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.start_batch * self.local_batch_size:]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start_batch * self.local_batch_size
