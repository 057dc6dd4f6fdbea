"""One caption (or a list) per line or row: CSV/TSV as open_clip reads it, and JSON Lines."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

from utils.data.sources.records import Record, Source
from utils.errors import UserError


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path} does not exist; point input at the caption file")
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e}); save it as UTF-8") from e


def _merged(source: Source, rows: Iterator[tuple[str, list, str]]) -> Iterator[Record]:
    """Rows naming the same image become one record, in first-seen order."""
    images: dict[str, tuple[list, str]] = {}
    for image, texts, where in rows:
        images.setdefault(image.strip().replace("\\", "/"), ([], where))[0].extend(texts)
    for image, (texts, where) in images.items():
        yield Record(source.image_path(image), source.captions(texts, where), None, where)


def separator_of(path: Path, first_line: str, given: str) -> str:
    if given:
        return "\t" if given in ("\\t", "tab") else given
    if path.suffix.lower() == ".tsv":
        return "\t"
    try:
        return csv.Sniffer().sniff(first_line, delimiters=",\t;|").delimiter
    except csv.Error:
        return ","


def read_csv(source: Source) -> Iterator[Record]:
    """A header row, then one image and caption per row (columns `image_column`, `caption_column`)."""
    lines = _lines(source.input)
    if not lines:
        raise UserError(f"{source.input} is empty")
    reader = csv.reader(lines, delimiter=separator_of(source.input, lines[0], source.separator))
    header = next(reader)
    missing = [c for c in (source.image_column, source.caption_column) if c not in header]
    if missing:
        raise UserError(f"{source.input} has no column {', '.join(map(repr, missing))}; its columns are "
                        f"{', '.join(map(repr, header))}. Name the right ones (convert.py: image_column / caption_column; "
                        "train.py, eval.py: csv_image_column / csv_caption_column)")
    image_at, caption_at = header.index(source.image_column), header.index(source.caption_column)

    def rows() -> Iterator[tuple[str, list, str]]:
        for row in reader:
            where = f"{source.input}, row {reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                source.problems.add(where, f"has {len(row)} fields, the header has {len(header)}")
            elif not row[image_at].strip():
                source.problems.add(where, f"empty {source.image_column!r}")
            else:
                yield row[image_at], [row[caption_at]], where

    return _merged(source, rows())


def read_jsonl(source: Source) -> Iterator[Record]:
    """One {"image": ..., "caption": str or [str, ...]} object per line."""
    def rows() -> Iterator[tuple[str, list, str]]:
        for number, line in enumerate(_lines(source.input), start=1):
            where = f"{source.input}, line {number}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                source.problems.add(where, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(record, dict) or not isinstance(record.get("image"), str) or "caption" not in record:
                source.problems.add(where, f"needs \"image\" (text) and \"caption\", got {line[:80]}")
                continue
            captions = record["caption"]
            yield record["image"], captions if isinstance(captions, list) else [captions], where

    return _merged(source, rows())
