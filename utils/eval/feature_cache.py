"""Evaluation features on disk, keyed by everything that determines them, so a repeat run skips encoding."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from utils.files import atomic_write_bytes

_CHUNK = 1 << 20


def _file_digest(path: Path, h) -> None:
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)


def hash_weights(h, model_path: str | Path) -> None:
    """Feed the weights' content into `h`: a file's bytes, or every file of a folder (a transformers or open_clip
    folder) with its path inside the folder. The file's own name is left out: a byte-identical copy under another
    name is the same weights."""
    weights = Path(model_path)
    if not weights.is_dir():
        _file_digest(weights, h)
        return
    for path in sorted(weights.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(weights).as_posix().encode() + b"\0")
            _file_digest(path, h)


def model_identity(model_path: str, phi: str) -> str:
    """What features depend on, as recorded by folder searches, embeddings and indexes: the weights' content
    (sha256 of their bytes, not their file name: a copy under another name is the same weights) and the
    architecture."""
    if not model_path:
        return f"random:{phi}"
    h = hashlib.sha256(phi.encode())
    hash_weights(h, model_path)
    return h.hexdigest()[:32]


def cache_key(model_path: str | Path, phi: str, json_path: str | Path | None, root: str | Path, entries: list[dict],
              preprocessing: dict) -> str:
    """sha256 over the weights' bytes, phi, the dataset file's bytes (when there is one), each image's size and
    mtime, and preprocessing."""
    h = hashlib.sha256()
    hash_weights(h, model_path)
    if json_path is not None:
        _file_digest(Path(json_path), h)
    for entry in entries:
        stat = (Path(root) / entry["image"]).stat()
        h.update(f"{entry['image']}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    h.update(json.dumps({"phi": phi, **preprocessing}, sort_keys=True).encode())
    return h.hexdigest()[:32]


def load_features(cache_dir: str | Path, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    path = Path(cache_dir) / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        tensors = load_file(path)
        return tensors["image_features"], tensors["text_features"]
    except Exception:  # a damaged cache is only a cache: encode again
        return None


def save_features(cache_dir: str | Path, key: str, image_features: torch.Tensor, text_features: torch.Tensor) -> Path:
    path = Path(cache_dir) / f"{key}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(save({"image_features": image_features.contiguous(),
                             "text_features": text_features.contiguous()}), path)
    return path
