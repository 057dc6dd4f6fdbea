"""convert.py --resize N: every image once at short side N (upright, aspect kept, never upscaled), in parallel.

Training decodes every image again each epoch; a 12-megapixel photo costs about 30 times the decode of the
same picture at 256 px. img2dataset resizes at download time for that reason; this does it for data already on
disk. The copies go to <output_dir>/<name>_<N>px/, mirroring the images' folders; each is written atomically
and carries a record of what it was made from (the source's size and modification time, the short side, the JPEG
quality) in a JPEG comment, so a rerun keeps every copy that is intact and current, and remakes the missing, the
damaged and those whose source or settings changed.
"""
from __future__ import annotations

import io
import json
import os
import signal
import struct
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from utils.data.images import open_image
from utils.data.sources.records import SHOWN, Record
from utils.errors import UserError
from utils.files import atomic_write_bytes, human_size

JPEG_SUFFIXES = (".jpg", ".jpeg")
# Starts the JPEG comment that records what a copy was made from; "v" names the way copies are made, so a change
# to it remakes them all.
RECORD = b"clip-pytorch resize "
RECORD_VERSION = 1


@dataclass
class Resized:
    """What resizing one image did: "written", "remade" (the copy there was of an older source or other
    settings), "kept" (an intact, current copy was there), "copied" (small enough already) or "failed" (then
    `why`)."""

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


def made_from(source: Path, short_side: int, quality: int) -> dict:
    """What a copy of `source` made now would record: the source as it is now and the settings."""
    stat = source.stat()
    return {"v": RECORD_VERSION, "source_bytes": stat.st_size, "source_mtime_ns": stat.st_mtime_ns,
            "short_side": short_side, "jpeg_quality": quality}


def _leading_segments(data: bytes):
    """(marker, start, end) of the APPn and COM segments right after a JPEG's start marker."""
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF and (0xE0 <= data[at + 1] <= 0xEF or data[at + 1] == 0xFE):
        end = at + 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
        yield data[at + 1], at, end
        at = end


def with_record(data: bytes, record: dict) -> bytes:
    """JPEG `data` with `record` in a comment after its APPn segments (where EXIF readers still find EXIF first);
    decoders skip comments, so the pixels are the same."""
    payload = RECORD + json.dumps(record, sort_keys=True).encode()
    at = 2
    for _, _, end in _leading_segments(data):
        at = end
    return data[:at] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + data[at:]


def read_record(path: Path) -> dict | None:
    """The record a copy carries, or None (none, or not a JPEG)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256 * 1024)  # the APPn segments (EXIF is at most 64 KB each) and the comment
    except OSError:
        return None
    if head[:2] != b"\xff\xd8":
        return None
    for marker, start, end in _leading_segments(head):
        if marker == 0xFE and head[start + 4:end].startswith(RECORD):
            try:
                return json.loads(head[start + 4 + len(RECORD):end])
            except ValueError:
                return None
    return None


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
        record = made_from(source, short_side, quality)
        source_bytes = record["source_bytes"]
        with Image.open(source) as header:
            size = target_size(upright_size(header), short_side)
            plain_jpeg = header.format == "JPEG" and header.getexif().get(0x0112, 1) == 1
            small = size == upright_size(header)
        there = target.exists()
        current = read_record(target) == record if there else False
        if current and _intact(target, size):
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
        if there and not current and outcome == "written" and _intact(target, size):
            outcome = "remade"  # whole, but made from another source or with other settings
        data = with_record(data, record)
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
    # Ctrl-C reaches every worker too: they ignore it (each finishes the atomic write it is in) and the queued
    # work is cancelled, so the run stops with one line, keeping what was written, instead of a traceback from each
    # worker. The futures are kept here because an interrupted `pool.map` cancels nothing until iterated.
    pool = ProcessPoolExecutor(max(1, workers), initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
    futures = []
    try:
        for task in tasks:
            futures.append(pool.submit(resize_one, task))
        done_in_order = (future.result() for future in futures)
        results = dict(zip(images, tqdm(done_in_order, total=len(tasks), desc=f"resizing to {short_side} px",
                                        unit="image")))
    except KeyboardInterrupt:
        for future in futures:
            future.cancel()
        pool.shutdown(wait=False)
        raise
    pool.shutdown()
    problems = [f"{image}: {result.why}" for image, result in results.items() if result.outcome == "failed"]
    done = [result for result in results.values() if result.outcome != "failed"]
    if not done:
        raise UserError(f"none of the {len(images)} images could be resized:\n  " + "\n  ".join(problems[:SHOWN]))
    before, after = sum(r.source_bytes for r in done), sum(r.output_bytes for r in done)
    counts = {outcome: sum(r.outcome == outcome for r in done) for outcome in ("written", "remade", "kept", "copied")}
    remade = f", {counts['remade']} remade (their source or the settings changed)" if counts["remade"] else ""
    line = (f"resized {len(done)} images to short side {short_side} in {folder} ({counts['written']} written, "
            f"{counts['kept']} already there and intact, {counts['copied']} small enough, copied{remade}): "
            f"{human_size(before)} -> {human_size(after)}, {human_size(max(before - after, 0))} smaller"
            + (f" ({100 * (1 - after / before):.0f}%)" if before else ""))
    resized = {split: [r._replace(image=targets[r.image.resolve()]) for r in split_records
                       if results[r.image.resolve()].outcome != "failed"]
               for split, split_records in splits.items()}
    return resized, line, problems
