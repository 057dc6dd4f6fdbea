"""Chinese-CLIP's release layout: `{split}_texts.jsonl` (text_id, text, image_ids) + `{split}_imgs.tsv`
(image_id<TAB>base64 image), split = train / valid / test. Images are decoded to files in the work dir."""
from __future__ import annotations

import base64
import binascii
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Iterator

from PIL import Image

from utils.data.sources.records import Record, Source, split_name
from utils.errors import UserError


def _texts(path: Path, source: Source) -> dict[str, list]:
    """image_id -> its captions, from one *_texts.jsonl."""
    captions: dict[str, list] = defaultdict(list)
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            source.problems.add(where, f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(record, dict) or "text" not in record or not isinstance(record.get("image_ids"), list):
            source.problems.add(where, f"needs \"text\" and an \"image_ids\" list, got {line[:80]}")
            continue
        for image_id in record["image_ids"]:
            captions[str(image_id)].append(record["text"])
    return captions


_URL_SAFE = str.maketrans("-_", "+/")


def _decode(text: str) -> tuple[bytes, str]:
    """(image bytes, file suffix) of one base64 field; raises ValueError when it is not an image."""
    # Chinese-CLIP writes the URL-safe alphabet; accept the standard one too, and missing padding.
    text = text.strip().translate(_URL_SAFE)
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not base64 ({e})") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = (image.format or "JPEG").lower()
    except Exception as e:  # PIL raises many types for non-images
        raise ValueError(f"not an image ({type(e).__name__})") from None
    return data, {"jpeg": ".jpg"}.get(kind, f".{kind}")


def read_cn_clip(source: Source) -> Iterator[Record]:
    folder = source.input if source.input.is_dir() else source.input.parent
    text_files = sorted(folder.glob("*_texts.jsonl"))
    if not text_files:
        raise UserError(f"{folder} holds no *_texts.jsonl: point input at the folder of Chinese-CLIP's "
                        "train_texts.jsonl / train_imgs.tsv (and valid_*, test_*)")
    for text_file in text_files:
        prefix = text_file.name[:-len("_texts.jsonl")]
        split = split_name(prefix, str(text_file), source.problems)
        images_tsv = folder / f"{prefix}_imgs.tsv"
        if not images_tsv.is_file():
            raise UserError(f"{images_tsv} is missing: Chinese-CLIP keeps the images of {text_file.name} there")
        captions = _texts(text_file, source)
        out = source.work_dir / "images" / prefix
        out.mkdir(parents=True, exist_ok=True)
        with images_tsv.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                image_id, tab, encoded = line.rstrip("\n").partition("\t")
                where = f"{images_tsv}, line {number}"
                if not tab:
                    source.problems.add(where, "expected image_id<TAB>base64")
                    continue
                texts = captions.pop(image_id.strip(), None)
                if texts is None:
                    continue  # an image no caption names
                try:
                    data, suffix = _decode(encoded)
                except ValueError as e:
                    source.problems.add(where, f"image {image_id.strip()}: {e}")
                    continue
                path = out / f"{image_id.strip()}{suffix}"
                path.write_bytes(data)
                yield Record(path, source.captions(texts, where), split, where)
        for image_id in captions:
            source.problems.add(str(text_file), f"image_id {image_id} has captions but no image in {images_tsv.name}")
