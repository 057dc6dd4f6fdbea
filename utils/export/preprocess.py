"""The eval preprocessing of utils/data/images.py with PIL and numpy only, for an onnxruntime deployment.

It follows torchvision's arithmetic step for step (tests/test_onnx.py holds it to the PyTorch transform), so
image.onnx sees the pixels the PyTorch model would.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from utils.data.images import letterbox, resize_crop


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
