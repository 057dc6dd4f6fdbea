"""mode="dir_predict": score every image under a folder against captions or labels, in batches, into a CSV."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from utils.data.images import IMAGE_SUFFIXES, image_files
from utils.errors import UserError
from utils.files import atomic_write_bytes, check_writable

SHOWN = 20


def images_under(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"dir_origin_path {folder} is not a folder")
    paths = image_files(folder)
    if not paths:
        raise UserError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}), searched recursively")
    return paths


class _Pictures(Dataset):
    """(index, pixels or None, why not) per image: an unreadable file is reported, not fatal."""

    def __init__(self, paths: Sequence[Path], open_image, transform):
        self.paths, self.open_image, self.transform = paths, open_image, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, self.transform(self.open_image(self.paths[index])), None
        except Exception as e:  # PIL raises many types for unreadable files
            return index, None, f"{type(e).__name__}: {e}"


def _as_list(batch):
    return batch


@torch.no_grad()
def predict_folder(model, names: list[str], targets: torch.Tensor, folder: str | Path, out: str | Path,
                   top_k: int = 5, batch_size: int = 32, num_workers: int = 0) -> tuple[Path, int, list[str]]:
    """Write the CSV `out`: each readable image's path (relative to folder), its top_k names and their
    probabilities. `targets` are unit text or class embeddings, one per name. Returns (csv path, images scored,
    problems)."""
    paths = images_under(folder)
    out = Path(out)
    check_writable(out.parent, "dir_save_path")
    k = min(top_k, len(names))
    scale = model.net.logit_scale.exp().float()
    rows, problems = [], []
    loader = DataLoader(_Pictures(paths, model.open_image, model.transform), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_as_list)
    for batch in tqdm(loader, desc="images", unit="batch"):
        good = [(i, pixels) for i, pixels, _ in batch if pixels is not None]
        problems += [f"{paths[i]}: {why}" for i, pixels, why in batch if pixels is None]
        if not good:
            continue
        pixels = torch.stack([p for _, p in good]).to(model.device, next(model.net.parameters()).dtype)
        features = F.normalize(model.net.encode_image(pixels).float(), dim=-1)
        probs = (scale * features @ targets.float().T).softmax(dim=-1)
        top = probs.topk(k, dim=-1)
        for (i, _), values, indices in zip(good, top.values.tolist(), top.indices.tolist()):
            row = [paths[i].relative_to(folder).as_posix()]
            for value, index in zip(values, indices):
                row += [names[index], f"{value:.4f}"]
            rows.append(row)
    if not rows:
        raise UserError(f"none of the {len(paths)} images under {folder} could be read:\n  " + "\n  ".join(problems[:SHOWN]))
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["path"] + [f"{field}{rank}" for rank in range(1, k + 1) for field in ("label", "prob")])
    writer.writerows(rows)
    atomic_write_bytes(text.getvalue().encode("utf-8"), out)
    return out, len(rows), problems
