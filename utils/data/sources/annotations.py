"""Annotation files of the public caption sets: Karpathy's splits, COCO captions, the Flickr8k text release."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

from utils.data.sources.records import Record, Source, split_name
from utils.errors import UserError


def load_json(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"{path} does not exist; point input at the annotation file")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e}); save it as UTF-8") from e


def _field(record: dict, key: str, where: str, source: Source, kind: type = str):
    value = record.get(key) if isinstance(record, dict) else None
    if not isinstance(value, kind):
        source.problems.add(where, f"needs {key!r} ({kind.__name__}), got {str(record)[:80]}")
        return None
    return value


def read_karpathy(source: Source) -> Iterator[Record]:
    """dataset_flickr8k/30k/coco.json: images[].filename, optional filepath, split, sentences[].raw."""
    data = load_json(source.input)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise UserError(f"{source.input} has no \"images\" list: is it one of Karpathy's dataset_*.json files?")
    for i, image in enumerate(images):
        where = f"{source.input}, images[{i}]"
        filename = _field(image, "filename", where, source)
        sentences = _field(image, "sentences", where, source, list)
        raw_split = _field(image, "split", where, source)
        if filename is None or sentences is None or raw_split is None:
            continue
        split = split_name(raw_split, where, source.problems)
        texts = [s.get("raw") if isinstance(s, dict) else s for s in sentences]
        folder = source.image_path(image.get("filepath") or "")
        yield Record(source.image_path(filename, folder), source.captions(texts, where), split, where)


def read_coco(source: Source) -> Iterator[Record]:
    """captions_*.json: images[].id/file_name and annotations[].image_id/caption; an image's captions merge."""
    data = load_json(source.input)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or \
            not isinstance(data.get("annotations"), list):
        raise UserError(f"{source.input} needs \"images\" and \"annotations\" lists, as COCO's captions_*.json")
    captions: dict[Any, list] = defaultdict(list)
    for i, annotation in enumerate(data["annotations"]):
        where = f"{source.input}, annotations[{i}]"
        if not isinstance(annotation, dict) or "image_id" not in annotation or "caption" not in annotation:
            source.problems.add(where, f"needs \"image_id\" and \"caption\", got {str(annotation)[:80]}")
            continue
        captions[annotation["image_id"]].append(annotation["caption"])
    for i, image in enumerate(data["images"]):
        where = f"{source.input}, images[{i}]"
        name = _field(image, "file_name", where, source)
        if name is None or "id" not in image:
            continue
        yield Record(source.image_path(name), source.captions(captions.pop(image["id"], []), where), None, where)
    for image_id in captions:
        source.problems.add(str(source.input), f"annotations name image_id {image_id!r}, which \"images\" lacks")


def _split_lists(folder: Path) -> dict[str, str]:
    """Flickr_8k.{train,dev,test}Images.txt beside the token file: image name -> split."""
    splits = {}
    for split, stem in (("train", "train"), ("val", "dev"), ("test", "test")):
        path = folder / f"Flickr_8k.{stem}Images.txt"
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    splits[line.strip()] = split
    return splits


def read_flickr8k(source: Source) -> Iterator[Record]:
    """Flickr8k.token.txt (`name.jpg#k<TAB>caption`) with the Flickr_8k.*Images.txt split lists beside it."""
    if not source.input.is_file():
        raise UserError(f"{source.input} does not exist; point input at Flickr8k.token.txt")
    splits = _split_lists(source.input.parent)
    captions: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(source.input.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        key, tab, text = line.partition("\t")
        name = key.rsplit("#", 1)[0].strip()
        if not tab or not name:
            source.problems.add(f"{source.input}, line {number}", f"expected name.jpg#k<TAB>caption, got {line[:80]!r}")
            continue
        captions.setdefault(name, []).append(text)
        first_line.setdefault(name, number)
    for name, texts in captions.items():
        where = f"{source.input}, line {first_line[name]}"
        split = splits.get(name.replace("\\", "/").rsplit("/", 1)[-1]) if splits else None
        yield Record(source.image_path(name), source.captions(texts, where), split, where)
