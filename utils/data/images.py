"""Opening user images as RGB whatever their mode, and the preprocessing CLIP was trained with."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
LETTERBOX_FILL = (128, 128, 128)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_files(folder: Path) -> list[Path]:
    """Every file under `folder` (recursively) with an image suffix, sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB: EXIF rotation applied, transparency composited on white, 16-bit scaled to 8-bit."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # PIL's own convert clips these at 255, turning most 16-bit photos white.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def open_rgb(path) -> Image.Image:
    with Image.open(path) as image:
        return to_rgb(image)


class Letterbox:
    """Fit the whole image inside size x size, keeping its aspect ratio, on a grey canvas."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        scale = self.size / max(image.size)
        w, h = (max(1, round(d * scale)) for d in image.size)
        canvas = Image.new("RGB", (self.size, self.size), LETTERBOX_FILL)
        canvas.paste(image.resize((w, h), Image.BICUBIC), ((self.size - w) // 2, (self.size - h) // 2))
        return canvas


def to_tensor() -> list:
    import torch
    from torchvision.transforms import v2

    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(OPENAI_MEAN, OPENAI_STD)]


def eval_transform(size: int, letterbox: bool = False):
    """OpenAI's inference preprocessing (bicubic resize of the short side, centre crop), or letterbox: a
    torchvision v2.Compose from a PIL image to a normalised float tensor."""
    from torchvision.transforms import InterpolationMode, v2

    if letterbox:
        return v2.Compose([Letterbox(size), *to_tensor()])
    return v2.Compose([v2.Resize(size, interpolation=InterpolationMode.BICUBIC), v2.CenterCrop(size), *to_tensor()])
