"""The eval preprocessing of utils/data/images.py with PIL and numpy only, for an onnxruntime deployment.

It follows torchvision's arithmetic step for step (tests/test_onnx.py holds it to the PyTorch transform), so
image.onnx sees the pixels the PyTorch model would.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from utils.data.images import Resized
from utils.data.preprocess import LETTERBOX_FILL, Preprocess


def record(config: dict) -> Preprocess:
    """The preprocessing record config.json of an export holds; an export written before the record was kept
    says only whether it letterboxes."""
    if "resize_mode" in config:
        return Preprocess.from_dict({**config, "fill": config.get("fill", LETTERBOX_FILL)}, "config.json")
    return Preprocess(mean=config["mean"], std=config["std"], fill=config.get("letterbox_fill", LETTERBOX_FILL),
                      resize_mode="longest" if config.get("letterbox") else "shortest")


def to_config(preprocess: Preprocess) -> dict:
    """What record() reads back."""
    return preprocess.to_dict()


def pixels(images: Sequence[Image.Image], config: dict) -> np.ndarray:
    """(N, 3, S, S) image.onnx input for RGB `images`, as config.json of the export describes it."""
    preprocess = record(config)
    resize = Resized(config["image_size"], preprocess)
    mean = np.asarray(preprocess.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(preprocess.std, dtype=np.float32)[:, None, None]
    rows = []
    for image in images:
        chw = np.asarray(resize(image), dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / 255.0  # 3, S, S
        rows.append((chw - mean) / std)
    return np.stack(rows).astype(config["dtype"])
