"""Records out: split, checked, written as the original's JSON (or as WebDataset shards), and summarised."""
from __future__ import annotations

import hashlib
import io
import json
import os
import statistics
import tarfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from utils.data.sources.records import SHOWN, Record
from utils.files import atomic_write_bytes, refuse_existing

SPLITS = ("train", "val", "test")


def assign_splits(records: Iterable[Record], val_ratio: float, test_ratio: float,
                  seed: int) -> dict[str, list[Record]]:
    """The layout's own splits where it has them (records without one join train); otherwise a seeded random
    val_ratio / test_ratio share of the images."""
    records = list(records)
    splits: dict[str, list[Record]] = {split: [] for split in SPLITS}
    if any(r.split for r in records):
        for record in records:
            splits[record.split or "train"].append(record)
        return splits
    order = np.random.default_rng(seed).permutation(len(records))
    n_val, n_test = round(len(records) * val_ratio), round(len(records) * test_ratio)
    for rank, index in enumerate(order):
        splits["val" if rank < n_val else "test" if rank < n_val + n_test else "train"].append(records[index])
    for split in SPLITS:  # file order, not shuffled order
        splits[split].sort(key=lambda r: str(r.image))
    return splits


def image_problem(path: Path) -> str | None:
    """Why an image cannot be used, from its file and header (a full decode is the training pre-flight's job)."""
    if not path.is_file():
        return "image file missing"
    try:
        with Image.open(path) as image:
            if image.width == 0 or image.height == 0:
                return "image has zero width or height"
    except Exception as e:  # PIL raises many types for non-images
        return f"not a readable image ({type(e).__name__})"
    return None


def usable(splits: dict[str, list[Record]], workers: int = 8) -> tuple[dict[str, list[Record]], list[str], int]:
    """(splits without records whose image is unusable or that have no caption, those problems, captionless count)."""
    everything = [r for split in SPLITS for r in splits[split]]
    with ThreadPoolExecutor(workers) as pool:
        verdicts = dict(zip((r.image for r in everything), pool.map(image_problem, (r.image for r in everything))))
    problems = [f"{r.where}: {verdicts[r.image]}: {r.image}" for r in everything if verdicts[r.image]]
    captionless = sum(1 for r in everything if not verdicts[r.image] and not r.captions)
    kept = {split: [r for r in splits[split] if not verdicts[r.image] and r.captions] for split in SPLITS}
    return kept, problems, captionless


def relative(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path.resolve(), root.resolve())).as_posix()


def write_json(splits: dict[str, list[Record]], output_dir: Path, name: str, overwrite: bool) -> dict[str, Path]:
    """`<name>_<split>.json` in the original's format, image paths relative to output_dir."""
    targets = {split: output_dir / f"{name}_{split}.json" for split in SPLITS if splits[split]}
    refuse_existing(list(targets.values()), overwrite, "another name or output_dir")
    for split, path in targets.items():
        entries = [{"image": relative(r.image, output_dir), "caption": r.captions} for r in splits[split]]
        atomic_write_bytes(json.dumps(entries, ensure_ascii=False, indent=1).encode("utf-8"), path)
    return targets


def write_shards(splits: dict[str, list[Record]], output_dir: Path, name: str, shard_size: int,
                 overwrite: bool) -> dict[str, list[Path]]:
    """`<name>_<split>/NNNNN.tar`, img2dataset's layout: key.<image suffix>, key.txt (first caption),
    key.json ({"caption": [all captions], "image": original path})."""
    written: dict[str, list[Path]] = {}
    for split in SPLITS:
        records = splits[split]
        if not records:
            continue
        folder = output_dir / f"{name}_{split}"
        shards = [folder / f"{i:05d}.tar" for i in range(-(-len(records) // shard_size))]
        refuse_existing(shards, overwrite, "another name or output_dir")
        folder.mkdir(parents=True, exist_ok=True)
        for number, shard in enumerate(shards):
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as tar:
                for offset, record in enumerate(records[number * shard_size:(number + 1) * shard_size]):
                    key = f"{number * shard_size + offset:09d}"
                    suffix = record.image.suffix.lower().lstrip(".") or "jpg"
                    meta = {"caption": record.captions, "image": record.image.name}
                    for member, data in ((f"{key}.{suffix}", record.image.read_bytes()),
                                         (f"{key}.txt", record.captions[0].encode("utf-8")),
                                         (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))):
                        info = tarfile.TarInfo(member)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            atomic_write_bytes(buffer.getvalue(), shard)
        written[split] = shards
    return written


def _duplicate_images(records: list[Record]) -> int:
    """Images whose bytes equal an earlier image's: hashed only where file sizes collide."""
    by_size: dict[int, list[Path]] = defaultdict(list)
    for record in records:
        by_size[record.image.stat().st_size].append(record.image)
    duplicates = 0
    for paths in by_size.values():
        if len(paths) > 1:
            digests = Counter(hashlib.sha1(p.read_bytes()).hexdigest() for p in paths)
            duplicates += sum(n - 1 for n in digests.values())
    return duplicates


def summary(splits: dict[str, list[Record]], too_long: Callable[[str], bool] | None, problems: list[str],
            captionless: int, empty_captions: int, uncaptioned: list[Path]) -> str:
    records = [r for split in SPLITS for r in splits[split]]
    captions = [c for r in records for c in r.captions]
    lines = []
    for split in SPLITS:
        if splits[split]:
            counts = [len(r.captions) for r in splits[split]]
            lines.append(f"  {split:<6}{len(counts):>8} images {sum(counts):>9} captions   captions per image "
                         f"min {min(counts)} / mean {statistics.mean(counts):.2f} / max {max(counts)}")
    repeated = sum(n - 1 for n in Counter(captions).values())
    if too_long is None:
        long_line = ("  captions longer than the text tower's context: not counted (its tokenizer comes with the "
                     "weights; train.py's input report counts them)")
    else:
        long = sum(map(too_long, captions))
        long_line = (f"  captions longer than the text tower's context: {long} "
                     f"({100 * long / max(len(captions), 1):.1f}%; they are truncated)")
    lines += [f"  exact-duplicate images: {_duplicate_images(records)}; exact-duplicate captions: {repeated}",
              long_line,
              f"  empty captions dropped: {empty_captions}; images with no caption left, dropped: {captionless}"]
    if uncaptioned:
        lines.append(f"  images without a .txt, left out: {len(uncaptioned)}, e.g. "
                     + ", ".join(str(p) for p in uncaptioned[:3]))
    if problems:
        lines.append(f"  images missing or unreadable, left out: {len(problems)}")
        lines += [f"    {p}" for p in problems[:SHOWN]]
        if len(problems) > SHOWN:
            lines.append(f"    ... and {len(problems) - SHOWN} more")
    else:
        lines.append("  images missing or unreadable: 0")
    return "\n".join(lines)
