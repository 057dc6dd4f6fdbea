"""The eval preprocessing of utils/data/images.py with PIL and numpy only, for an onnxruntime deployment.

It follows torchvision's arithmetic step for step (tests/test_onnx.py holds it to the PyTorch transform), so
image.onnx sees the pixels the PyTorch model would.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image


def resize_crop(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize of the shorter side to `size` (the longer one rounded down), then the centre size x size."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def letterbox(image: Image.Image, size: int, fill: Sequence[int]) -> Image.Image:
    """The whole image resized to fit size x size, keeping its aspect ratio, centred on a `fill` canvas."""
    scale = size / max(image.size)
    w, h = (max(1, round(d * scale)) for d in image.size)
    canvas = Image.new("RGB", (size, size), tuple(fill))
    canvas.paste(image.resize((w, h), Image.BICUBIC), ((size - w) // 2, (size - h) // 2))
    return canvas


def pixels(images: Sequence[Image.Image], config: dict) -> np.ndarray:
    """(N, 3, S, S) image.onnx input for RGB `images`, as config.json of the export describes it."""
    size = config["image_size"]
    mean = np.asarray(config["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(config["std"], dtype=np.float32)[:, None, None]
    rows = []
    for image in images:
        image = letterbox(image, size, config["letterbox_fill"]) if config["letterbox"] else resize_crop(image, size)
        chw = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / 255.0  # 3, S, S
        rows.append((chw - mean) / std)
    return np.stack(rows).astype(config["dtype"])
