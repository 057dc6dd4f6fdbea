"""Opening user images as RGB whatever their mode, decoded at the scale the model needs, and the preprocessing
CLIP was trained with."""
from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

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
    """The whole image, decoded in full: what open_image(path, None) gives."""
    return open_image(path, None)


def open_image(source: str | Path | bytes | BinaryIO, sides: Sequence[int] | None) -> Image.Image:
    """Upright RGB image (see to_rgb) from a path, bytes or a binary file.

    `sides` = (short, long): the fewest pixels the upright image's short and long sides must keep for the
    transform that follows (see eval_sides and crop_sides). A JPEG is then decoded at the smallest of libjpeg's
    DCT scales (1/8, 1/4, 1/2, 1) that keeps both, several times faster than in full; other formats, and
    `sides=None`, decode in full."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    with Image.open(source) as image:
        return decoded(image, sides)


def decoded(image: Image.Image, sides: Sequence[int] | None) -> Image.Image:
    """An opened image not yet decoded (Image.open's), as open_image returns it: for callers that read the
    header first (the web page checks the pixel count)."""
    if sides is not None and image.width and image.height:
        short, long = (max(1, int(side)) for side in sides)
        # draft() only reduces by k while the image stays at least the size asked for, in stored orientation;
        # the short side is the short side whichever way EXIF turns the picture.
        image.draft(None, (short, long) if image.width <= image.height else (long, short))
    return to_rgb(image)


def decode_ahead(items: Sequence[Any], load: Callable[[Any], Any], batch_size: int,
                 threads: int) -> Iterator[list[Any]]:
    """[load(item) for item in batch] for each batch of `items` in order, loaded by `threads` threads while the
    caller works on the batch before: decoding overlaps encoding, and at most two batches are held at once.
    PIL decodes and resizes without the GIL, so threads decode in parallel with no process start-up."""
    batches: Iterable[Sequence[Any]] = (items[i:i + batch_size] for i in range(0, len(items), batch_size))
    with ThreadPoolExecutor(max(1, threads)) as pool:
        pending = None
        for batch in batches:
            submitted = [pool.submit(load, item) for item in batch]
            if pending is not None:
                yield [future.result() for future in pending]
            pending = submitted
        if pending is not None:
            yield [future.result() for future in pending]


def eval_sides(size: int, letterbox: bool = False) -> tuple[int, int]:
    """(short, long) an image needs for eval_transform(size, letterbox) to downscale only: resize + centre crop
    scales the short side to `size`, letterbox the long side."""
    return (1, size) if letterbox else (size, size)


def crop_sides(size: int, scale: Sequence[float], ratio: Sequence[float], letterbox: bool = False) -> tuple[int, int]:
    """(short, long) an image needs so that a random resized crop of area share >= scale[0] and aspect ratio
    within `ratio`, resized to size x size, is never upscaled: even the smallest crop keeps `size` pixels a side.

    A crop of share s and aspect r of a W x H image is sqrt(s W H r) x sqrt(s W H / r), so its shorter side is at
    least sqrt(s_min * r_min * W * H) >= sqrt(s_min * r_min) * short side, with r_min = min(ratio[0], 1/ratio[1]).
    torchvision's fallback (the centre crop of the whole image within the ratio) keeps the whole short side.
    After a letterbox the crop is taken from the size x size canvas, which needs only the long side."""
    if letterbox:
        return eval_sides(size, True)
    narrowest = min(ratio[0], 1 / ratio[1], 1.0)
    short = math.ceil(size / math.sqrt(scale[0] * narrowest)) + 1  # + 1: torchvision rounds the crop's sides
    return short, short


def letterbox(image: Image.Image, size: int, fill: Sequence[int] = LETTERBOX_FILL) -> Image.Image:
    """The whole image resized to fit size x size, keeping its aspect ratio, centred on a `fill` canvas."""
    scale = size / max(image.size)
    w, h = (max(1, round(d * scale)) for d in image.size)
    canvas = Image.new("RGB", (size, size), tuple(fill))
    canvas.paste(image.resize((w, h), Image.BICUBIC), ((size - w) // 2, (size - h) // 2))
    return canvas


class Letterbox:
    """letterbox() as a transform, for torchvision pipelines."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        return letterbox(image, self.size)


def resize_crop(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize of the shorter side to `size` (the longer one rounded down), then the centre size x size:
    torchvision's v2.Resize + v2.CenterCrop on a PIL image, step for step."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_tensor() -> list:
    import torch
    from torchvision.transforms import v2

    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(OPENAI_MEAN, OPENAI_STD)]


class EvalTransform:
    """OpenAI's inference preprocessing (bicubic resize of the short side, centre crop), or letterbox, from a
    PIL image to a normalised float tensor (3, size, size).

    The same operations as torchvision's v2 Resize, CenterCrop, ToImage, ToDtype and Normalize, in the same order
    (tests hold it equal bit for bit), without importing torchvision: its import pulls in torch._dynamo, which
    doubles the start-up of predict.py and eval.py."""

    def __init__(self, size: int, letterbox: bool = False):
        self.size, self.letterbox = size, letterbox

    def __call__(self, image: Image.Image):
        import torch

        image = letterbox(image, self.size) if self.letterbox else resize_crop(image, self.size)
        pixels = torch.from_numpy(np.array(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8))
        pixels = pixels.permute(2, 0, 1)  # H, W, 3 -> 3, H, W
        pixels = pixels.to(torch.float32).mul_(1.0 / 255)
        mean = torch.as_tensor(OPENAI_MEAN, dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(OPENAI_STD, dtype=torch.float32).view(-1, 1, 1)
        return pixels.sub(mean).div_(std)


def eval_transform(size: int, letterbox: bool = False) -> EvalTransform:
    """OpenAI's inference preprocessing, or letterbox (see EvalTransform)."""
    return EvalTransform(size, letterbox)
