"""mode="dir_predict": score every image under a folder against captions or labels, in batches, into a CSV."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import torch
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


def _rows(paths: list[Path], folder: Path, names: list[str], positions: list[int], top) -> list[list[str]]:
    rows = []
    for i, values, indices in zip(positions, top.values.tolist(), top.indices.tolist()):
        row = [paths[i].relative_to(folder).as_posix()]
        for value, index in zip(values, indices):
            row += [names[index], f"{value:.4f}"]
        rows.append(row)
    return rows


@torch.no_grad()
def predict_folder(model, names: list[str], targets: torch.Tensor, folder: str | Path, out: str | Path,
                   top_k: int = 5, batch_size: int = 32, threads: int | None = None) -> tuple[Path, int, list[str]]:
    """Write the CSV `out`: each readable image's path (relative to folder), its top_k names and their
    probabilities. `targets` are unit text or class embeddings, one per name; `threads` decode the next batch
    while the model encodes this one (None: one per core, at most 4). Returns (csv path, images scored,
    problems)."""
    paths = images_under(folder)
    out = Path(out)
    check_writable(out.parent, "dir_save_path")
    k = min(top_k, len(names))
    rows = []
    with tqdm(total=len(paths), desc="images", unit="img") as bar:
        encoding = model.pipeline.encode(paths, batch_size, threads, progress=bar.update)
        for positions, features in encoding:
            probs = model.probabilities(model.net.logits(features, targets))
            rows += _rows(paths, folder, names, positions, probs.topk(k, dim=-1))
    problems = [f"{path}: {why}" for path, why in encoding.unreadable]
    if not rows:
        raise UserError(f"none of the {len(paths)} images under {folder} could be read:\n  " + "\n  ".join(problems[:SHOWN]))
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["path"] + [f"{field}{rank}" for rank in range(1, k + 1) for field in ("label", "prob")])
    writer.writerows(rows)
    atomic_write_bytes(text.getvalue().encode("utf-8"), out)
    return out, len(rows), problems
