"""convert.py --resize N: every image once at short side N (upright, aspect kept, never upscaled), in parallel.

Training decodes every image again each epoch; a 12-megapixel photo costs about 30 times the decode of the
same picture at 256 px. img2dataset resizes at download time for that reason; this does it for data already on
disk. The copies go to <output_dir>/<name>_<N>px/, mirroring the images' folders; each is written atomically,
so a rerun keeps every copy that is there and intact and makes only the missing ones.
"""
from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from utils.data.images import open_image
from utils.data.sources.records import SHOWN, Record
from utils.errors import UserError
from utils.files import atomic_write_bytes, human_size

JPEG_SUFFIXES = (".jpg", ".jpeg")


@dataclass
class Resized:
    """What resizing one image did: "written", "kept" (an intact copy was there), "copied" (small enough
    already) or "failed" (then `why`)."""

    outcome: str
    source_bytes: int
    output_bytes: int = 0
    why: str = ""


def target_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """(width, height) with the short side at `short_side`, aspect kept; the size itself when already smaller."""
    w, h = size
    if min(w, h) <= short_side:
        return w, h
    if w <= h:
        return short_side, max(1, round(h * short_side / w))
    return max(1, round(w * short_side / h)), short_side


def upright_size(image: Image.Image) -> tuple[int, int]:
    """The size after EXIF orientation, read from the header without decoding."""
    turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    return (image.height, image.width) if turned else image.size


def _intact(path: Path, size: tuple[int, int]) -> bool:
    """Whether `path` is a whole JPEG of `size`: decoded at 1/8 scale, so a truncated file shows."""
    try:
        with Image.open(path) as image:
            if image.format != "JPEG" or image.size != size:
                return False
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        return True
    except Exception:  # PIL raises many types for damaged files
        return False


def resize_one(task: tuple[Path, Path, int, int]) -> Resized:
    source, target, short_side, quality = task
    try:
        source_bytes = source.stat().st_size
        with Image.open(source) as header:
            size = target_size(upright_size(header), short_side)
            plain_jpeg = header.format == "JPEG" and header.getexif().get(0x0112, 1) == 1
            small = size == upright_size(header)
        if _intact(target, size):
            return Resized("kept", source_bytes, target.stat().st_size)
        if small and plain_jpeg:  # already small enough and upright: the bytes as they are, not re-encoded
            data, outcome = source.read_bytes(), "copied"
        else:
            image = open_image(source, (short_side, short_side))  # reduced-scale decode, EXIF applied
            if image.size != size:
                image = image.resize(size, Image.LANCZOS)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=quality)
            data, outcome = buffer.getvalue(), "written"
    except Exception as e:  # one unreadable image is reported, not fatal
        return Resized("failed", 0, why=f"{type(e).__name__}: {e}")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(data, target)  # a full disk stops the run (WriteError), with what was written kept
    return Resized(outcome, source_bytes, len(data))


def target_path(image: Path, root: Path, folder: Path) -> Path:
    """Where the copy of `image` goes: its path under `root` mirrored in `folder`; ".jpg" appended to names that
    are not JPEG already (a.png -> a.png.jpg), so no two images share a copy."""
    relative = Path(os.path.relpath(image, root))
    return folder / (relative if relative.suffix.lower() in JPEG_SUFFIXES else relative.with_name(relative.name + ".jpg"))


def resize_splits(splits: dict[str, list[Record]], folder: Path, short_side: int, quality: int,
                  workers: int | None = None) -> tuple[dict[str, list[Record]], str, list[str]]:
    """(splits whose records point at the resized copies, a summary line, problems), resized by `workers`
    processes (None: one per core). Images that fail to resize are left out, each listed in problems."""
    from tqdm import tqdm

    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    records = [r for split in splits.values() for r in split]
    images = sorted({r.image.resolve() for r in records})
    root = Path(os.path.commonpath([p.parent for p in images])) if images else folder
    targets = {image: target_path(image, root, folder) for image in images}
    tasks = [(image, targets[image], short_side, quality) for image in images]
    with ProcessPoolExecutor(max(1, workers)) as pool:
        results = dict(zip(images, tqdm(pool.map(resize_one, tasks, chunksize=4), total=len(tasks),
                                        desc=f"resizing to {short_side} px", unit="image")))
    problems = [f"{image}: {result.why}" for image, result in results.items() if result.outcome == "failed"]
    done = [result for result in results.values() if result.outcome != "failed"]
    if not done:
        raise UserError(f"none of the {len(images)} images could be resized:\n  " + "\n  ".join(problems[:SHOWN]))
    before, after = sum(r.source_bytes for r in done), sum(r.output_bytes for r in done)
    counts = {outcome: sum(r.outcome == outcome for r in done) for outcome in ("written", "kept", "copied")}
    line = (f"resized {len(done)} images to short side {short_side} in {folder} ({counts['written']} written, "
            f"{counts['kept']} already there and intact, {counts['copied']} small enough, copied): "
            f"{human_size(before)} -> {human_size(after)}, {human_size(max(before - after, 0))} smaller"
            + (f" ({100 * (1 - after / before):.0f}%)" if before else ""))
    resized = {split: [r._replace(image=targets[r.image.resolve()]) for r in split_records
                       if results[r.image.resolve()].outcome != "failed"]
               for split, split_records in splits.items()}
    return resized, line, problems
