"""A pass over a dataset before any work starts: every bad entry or image reported at once, or skipped."""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from utils.dataloader import entry_problem, normalise, read_json_list
from utils.errors import UserError
from utils.tokenizer import truncated

SHOWN = 20


def image_problem(path: Path) -> str | None:
    """Why an image cannot be trained on, or None. Decodes it (JPEG at 1/8 scale), so truncation shows."""
    if not path.is_file():
        return "image file missing" if not path.exists() else "image path is not a file"
    if path.stat().st_size == 0:
        return "image file is empty (0 bytes)"
    try:
        with Image.open(path) as image:
            if image.width == 0 or image.height == 0:
                return "image has zero width or height"
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Image.DecompressionBombError as e:
        return f"image is too large to decode safely ({e})"
    except Exception as e:  # PIL raises many types for unreadable or truncated files
        return f"image cannot be decoded ({type(e).__name__}: {e})"
    return None


def read_annotations(path: str | Path, skip_bad: bool = False,
                     columns: tuple[str, str] = ("filepath", "title")) -> list:
    """A caption file's entries: the original's JSON list, or JSON Lines / CSV / TSV (image and caption
    `columns`, open_clip's names by default), read as datasets/convert.py reads them; rows naming one image merge."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".jsonl", ".csv", ".tsv"):
        return read_json_list(path)
    from utils.data.sources.records import Source
    from utils.data.sources.tabular import read_csv, read_jsonl

    source = Source(input=Path(path), images=Path(), work_dir=Path(), image_column=columns[0],
                    caption_column=columns[1])
    entries = [{"image": record.image.as_posix(), "caption": record.captions}
               for record in (read_jsonl if suffix == ".jsonl" else read_csv)(source)]
    source.problems.report(str(path), skip_bad, switch="skip_bad_samples")
    return entries


def preflight(json_path: str | Path, root: str | Path, workers: int = 4, skip_bad: bool = False,
              quiet: bool = False, columns: tuple[str, str] = ("filepath", "title")) -> list[dict]:
    """Usable entries of `json_path` (JSON, JSON Lines, CSV or TSV); raises UserError listing problems unless
    `skip_bad`."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"datasets_path {root} does not exist; point it at the folder the JSON image paths are "
                        "relative to")
    raw = read_annotations(json_path, skip_bad, columns)
    problems: list[tuple[int, str, str]] = []
    candidates = []
    for i, entry in enumerate(raw):
        if problem := entry_problem(entry):
            problems.append((i, str(entry.get("image", "?")) if isinstance(entry, dict) else "?", problem))
        else:
            candidates.append((i, normalise(entry)))
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes without the GIL
        verdicts = list(pool.map(lambda item: image_problem(root / item[1]["image"]), candidates))
    good = []
    for (i, entry), problem in zip(candidates, verdicts):
        if problem:
            problems.append((i, entry["image"], f"{problem}: {root / entry['image']}"))
        else:
            good.append(entry)
    if problems:
        problems.sort()
        listing = "\n".join(f"  entry {i} ({image}): {why}" for i, image, why in problems[:SHOWN])
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        summary = f"{json_path}: {len(problems)} of {len(raw)} entries are unusable"
        if not skip_bad:
            raise UserError(f"{summary}:\n{listing}{more}\nFix or remove them, or set skip_bad_samples=True to "
                            "go on without them.")
        if not quiet:
            print(f"{summary}; skipping them (skip_bad_samples=True):\n{listing}{more}")
    if not good:
        raise UserError(f"{json_path}: no usable entries")
    return good


def input_report(train: list[dict], val: list[dict], tokenizer=None) -> list[str]:
    """One line for each thing in usable training inputs that is likely not what was meant: entries repeated
    exactly, images in both the training and the validation file, captions longer than the text tower's context
    (`tokenizer`'s). Nothing when there is nothing to say. Images are compared by path, as the files name them."""
    lines = []
    for name, entries in (("training", train), ("validation", val)):
        counts = Counter((os.path.normpath(e["image"]), tuple(e["caption"])) for e in entries)
        repeats = sum(n - 1 for n in counts.values())
        if repeats:
            (image, _), most = counts.most_common(1)[0]
            lines.append(f"{name} file: {repeats:,} of its {len(entries):,} entries repeat an earlier one exactly "
                         f"(same image and captions; {image} is there {most:,} times): each is "
                         f"{'trained on' if name == 'training' else 'counted'} as often as it appears")
    val_images = {os.path.normpath(e["image"]) for e in val}
    shared = val_images & {os.path.normpath(e["image"]) for e in train}
    if shared:
        lines.append(f"{len(shared):,} of the {len(val_images):,} validation images are in the training file too "
                     f"(e.g. {min(shared)}): the validation loss and recall on them measure memory, not how well "
                     "the model generalises")
    if tokenizer is not None:
        counts = {name: (sum(truncated(tokenizer, c) for e in entries for c in e["caption"]),
                         sum(len(e["caption"]) for e in entries))
                  for name, entries in (("training", train), ("validation", val))}
        if any(cut for cut, _ in counts.values()):
            lines.append(f"captions longer than the text tower's {tokenizer.context_length} tokens: "
                         + ", ".join(f"{cut:,} of {total:,} in the {name} file" for name, (cut, total) in counts.items())
                         + "; they are truncated (the text tower reads only their start)")
    return lines
