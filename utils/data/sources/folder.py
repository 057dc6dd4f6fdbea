"""Images with a same-name .txt beside them, one caption per line (img2dataset, clip-retrieval, diffusion sets)."""
from __future__ import annotations

from typing import Iterator

from utils.data.images import image_files
from utils.data.sources.records import Record, Source
from utils.errors import UserError



def read_folder(source: Source) -> Iterator[Record]:
    if not source.input.is_dir():
        raise UserError(f"{source.input} is not a folder; point input at the folder of images and .txt files")
    for image in image_files(source.input):
        text = image.with_suffix(".txt")
        if not text.is_file():
            source.problems.uncaptioned.append(image)
            continue
        try:
            lines = text.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            source.problems.add(str(text), f"not UTF-8 text ({e})")
            continue
        yield Record(image.resolve(), source.captions([line for line in lines if line.strip()], str(text)), None,
                     str(text))
