"""Opening user images as RGB whatever their mode, decoded at the scale the model needs, and the eval transform
of a preprocessing record (utils/data/preprocess.py)."""
from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from utils.data.preprocess import LETTERBOX_FILL, OPENAI, PIL_FILTERS, Preprocess

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


def sides_for(size: int, resize_mode: str) -> tuple[int, int]:
    """(short, long) an image needs for the eval resize of `resize_mode` to downscale only: `shortest` scales
    the short side to `size`, `longest` the long side, `squash` both."""
    return (1, size) if resize_mode == "longest" else (size, size)


def eval_sides(size: int, letterbox: bool = False) -> tuple[int, int]:
    """sides_for OpenAI's resize and crop, or the letterbox."""
    return sides_for(size, "longest" if letterbox else "shortest")


def crop_sides(size: int, scale: Sequence[float], ratio: Sequence[float],
               resize_mode: str = "shortest") -> tuple[int, int]:
    """(short, long) an image needs so that a random resized crop of area share >= scale[0] and aspect ratio
    within `ratio`, resized to size x size, is never upscaled: even the smallest crop keeps `size` pixels a side.

    A crop of share s and aspect r of a W x H image is sqrt(s W H r) x sqrt(s W H / r), so its shorter side is at
    least sqrt(s_min * r_min * W * H) >= sqrt(s_min * r_min) * short side, with r_min = min(ratio[0], 1/ratio[1]).
    torchvision's fallback (the centre crop of the whole image within the ratio) keeps the whole short side.
    After a letterbox (`longest`) or a squash the crop is taken from the size x size square, which
    needs only what that resize needs."""
    if resize_mode != "shortest":
        return sides_for(size, resize_mode)
    narrowest = min(ratio[0], 1 / ratio[1], 1.0)
    short = math.ceil(size / math.sqrt(scale[0] * narrowest)) + 1  # + 1: torchvision rounds the crop's sides
    return short, short


def _filter(interpolation: str) -> int:
    return PIL_FILTERS[interpolation]


def letterbox(image: Image.Image, size: int, fill: Sequence[int] = LETTERBOX_FILL,
              interpolation: str = "bicubic") -> Image.Image:
    """The whole image resized to fit size x size, keeping its aspect ratio, centred on a `fill` canvas: open_clip's
    ResizeKeepRatio(longest=1) + CenterCropOrPad, step for step (its arithmetic, so the sides round alike)."""
    w, h = image.size
    ratio = max(h / size, w / size)
    new_h, new_w = round(h / ratio), round(w / ratio)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), _filter(interpolation))
    if (new_w, new_h) == (size, size):
        return image
    canvas = Image.new("RGB", (size, size), tuple(fill))
    canvas.paste(image, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def squash(image: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Both sides resized to `size`, the aspect ratio given up: torchvision's Resize((size, size))."""
    return image if image.size == (size, size) else image.resize((size, size), _filter(interpolation))


class Resized:
    """The eval resize of a Preprocess record (resize_crop, letterbox or squash) as a transform of PIL images."""

    def __init__(self, size: int, preprocess: Preprocess = OPENAI):
        self.size, self.preprocess = size, preprocess

    def __call__(self, image: Image.Image) -> Image.Image:
        p = self.preprocess
        if p.resize_mode == "longest":
            return letterbox(image, self.size, p.fill, p.interpolation)
        if p.resize_mode == "squash":
            return squash(image, self.size, p.interpolation)
        return resize_crop(image, self.size, p.interpolation)


def resize_crop(image: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Resize of the shorter side to `size` (the longer one rounded down), then the centre size x size:
    torchvision's v2.Resize + v2.CenterCrop on a PIL image, step for step."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), _filter(interpolation))
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_tensor(preprocess: Preprocess = OPENAI) -> list:
    import torch
    from torchvision.transforms import v2

    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(preprocess.mean, preprocess.std)]


class EvalTransform:
    """The inference preprocessing of a Preprocess record (OpenAI's by default: bicubic resize of the short side,
    centre crop), from a PIL image to a normalised float tensor (3, size, size); `letterbox` keeps the whole
    picture whatever the record's resize mode.

    The same operations as torchvision's v2 Resize, CenterCrop, ToImage, ToDtype and Normalize (open_clip's
    image_transform for `longest` and `squash`), in the same order (tests hold it equal bit for bit), without
    importing torchvision: its import pulls in torch._dynamo, which doubles the start-up of predict.py and
    eval.py."""

    def __init__(self, size: int, letterbox: bool = False, preprocess: Preprocess | None = None):
        preprocess = preprocess or OPENAI
        self.size, self.preprocess = size, preprocess.letterboxed() if letterbox else preprocess
        self.letterbox = self.preprocess.resize_mode == "longest"
        self.resize = Resized(size, self.preprocess)

    def decode_sides(self) -> tuple[int, int]:
        """(short, long) pixels the decoder must keep for this transform to only downscale (open_image)."""
        return sides_for(self.size, self.preprocess.resize_mode)

    def __call__(self, image: Image.Image):
        import torch

        image = self.resize(image)
        pixels = torch.from_numpy(np.array(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8))
        pixels = pixels.permute(2, 0, 1)  # H, W, 3 -> 3, H, W
        pixels = pixels.to(torch.float32).mul_(1.0 / 255)
        mean = torch.as_tensor(self.preprocess.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(self.preprocess.std, dtype=torch.float32).view(-1, 1, 1)
        return pixels.sub(mean).div_(std)


def eval_transform(size: int, letterbox: bool = False, preprocess: Preprocess | None = None) -> EvalTransform:
    """The inference preprocessing of `preprocess` (OpenAI's when None), or letterbox (see EvalTransform)."""
    return EvalTransform(size, letterbox, preprocess)
