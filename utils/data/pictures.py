"""One way from pictures (paths, bytes, PIL images) to unit image features: opened at the size the transform
needs, transformed, batched with the next batch decoded ahead, encoded, and the unreadable ones listed."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from utils.data.images import decode_ahead, decoded, open_image, to_rgb
from utils.device import autocast, loader_workers


def decode_sides(transform) -> tuple[int, int] | None:
    """(short, long) the transform needs an image to keep (its decode_sides()); None, a transform that does not
    say, decodes in full."""
    sides = getattr(transform, "decode_sides", None)
    return sides() if callable(sides) else None


def why_unreadable(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def _name(source) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"<{type(source).__name__}>"


class Encoding:
    """The batches of one `ImagePipeline.encode` call, iterated once: (positions of the readable sources of the
    batch, their unit float32 features on the pipeline's device). `unreadable` lists (name, why) of the others,
    in input order, as they are met."""

    def __init__(self, pipeline: "ImagePipeline", sources: Sequence[Any], names: Sequence[str] | None,
                 batch_size: int, threads: int | None, progress: Callable[[int], None] | None,
                 features: bool = True):
        self.pipeline, self.sources, self.names, self.features = pipeline, list(sources), names, features
        self.batch_size, self.threads, self.progress = max(1, batch_size), threads, progress
        self.unreadable: list[tuple[str, str]] = []

    def _load(self, position: int):
        try:
            return position, self.pipeline.transform(self.pipeline.open(self.sources[position])), None
        except Exception as e:  # PIL raises many types for unreadable files
            return position, None, why_unreadable(e)

    def __iter__(self) -> Iterator[tuple[list[int], torch.Tensor]]:
        for batch in decode_ahead(range(len(self.sources)), self._load, self.batch_size,
                                  loader_workers(self.threads)):
            if self.progress is not None:
                self.progress(len(batch))
            for position, _, why in batch:
                if why is not None:
                    name = self.names[position] if self.names is not None else _name(self.sources[position])
                    self.unreadable.append((name, why))
            good = [(position, pixels) for position, pixels, _ in batch if pixels is not None]
            if good:
                pixels = torch.stack([x for _, x in good])
                yield [p for p, _ in good], (self.pipeline.encode_pixels(pixels) if self.features else
                                             pixels.to(self.pipeline.device, non_blocking=True))

    def all(self) -> tuple[torch.Tensor, list[int]]:
        """(unit features of every readable source, in order; their positions)."""
        rows, positions = [], []
        for where, features in self:
            positions += where
            rows.append(features)
        return (torch.cat(rows) if rows else torch.zeros(0, 0)), positions


class ImagePipeline:
    """Pictures -> model input -> unit image features, for every job that encodes images.

    `encode_image` is the image tower (CLIP.encode_image); `transform` makes its input from an upright RGB image
    and says, by its decode_sides(), how large a JPEG must be decoded (fast_decode=False: in full, for numbers
    reproduced bit for bit). Precision is the tower's: pixels go in as float32 and the tower casts them to its
    weights' dtype; `dtype` below float32 adds an autocast region, for fp32 weights computing in mixed precision
    (the training run's). Read-ahead is by threads (utils/data/images.decode_ahead): PIL decodes and resizes
    without the GIL, no process starts, bytes need no pickling, and it runs alike under DDP and in a web server."""

    def __init__(self, encode_image: Callable[[torch.Tensor], torch.Tensor], transform: Callable,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, fast_decode: bool = True):
        self.encode_image, self.transform = encode_image, transform
        self.device, self.dtype = torch.device(device), dtype
        self.decode_sides = decode_sides(transform) if fast_decode else None

    def open(self, source) -> Image.Image:
        """The image at a path, in bytes or a binary file (or an Image.open not yet decoded), upright RGB,
        decoded as large as the transform needs. Raises what PIL raises for an unreadable one."""
        if isinstance(source, Image.Image):
            return decoded(source, self.decode_sides)
        return open_image(source, self.decode_sides)

    def pixels(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """The model input of decoded images (made upright RGB first)."""
        images = [images] if isinstance(images, Image.Image) else images
        return torch.stack([self.transform(to_rgb(image)) for image in images])

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Float32 features of a batch of model input, unit vectors unless `normalize` is False."""
        with autocast(self.device, self.dtype):
            features = self.encode_image(pixels.to(self.device, non_blocking=True)).float()
        return F.normalize(features, dim=-1) if normalize else features

    def encode(self, sources: Sequence[Any], batch_size: int = 32, threads: int | None = None,
               names: Sequence[str] | None = None, progress: Callable[[int], None] | None = None) -> Encoding:
        """The features of `sources` (paths, bytes, binary files) batch by batch (see Encoding); `threads` decode
        the next batch while the model encodes this one (None: one per core, at most 4; 0: one). `names` name
        the sources in the unreadable list (default: the path); `progress(n)` hears of each batch's n sources."""
        return Encoding(self, sources, names, batch_size, threads, progress)

    def batches(self, sources: Sequence[Any], batch_size: int = 32, threads: int | None = None,
                names: Sequence[str] | None = None, progress: Callable[[int], None] | None = None) -> Encoding:
        """`encode`'s batches of model input on the pipeline's device instead of features, for a job that runs
        another part of the model on them (CoCa's captions)."""
        return Encoding(self, sources, names, batch_size, threads, progress, features=False)
