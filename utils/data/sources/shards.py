"""WebDataset tar shards as img2dataset writes them: `key.jpg|png|webp` with `key.txt` and/or `key.json`."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Iterator

from braceexpand import braceexpand

from utils.data.sources.records import Record, Source
from utils.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def shard_paths(pattern: str | Path) -> list[Path]:
    """A brace pattern (`shards/{00000..00127}.tar`), a folder of .tar files, a single .tar, or a text file
    listing shard paths one per line."""
    pattern = str(pattern)
    path = Path(pattern)
    if path.is_dir():
        paths = sorted(path.glob("*.tar"))
    elif path.suffix in (".txt", ".list", ".shards", ".shardlist") and path.is_file():
        paths = [Path(line.strip()) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        paths = [Path(p) for p in braceexpand(pattern)]
    missing = [p for p in paths if not p.is_file()]
    if not paths or missing:
        raise UserError(f"no shards at {pattern}" if not paths else
                        f"{len(missing)} of {len(paths)} shards of {pattern} do not exist, e.g. {missing[0]}")
    return paths


def sample_captions(files: dict[str, bytes]) -> list:
    """The captions of one sample: json's "caption"/"captions"/"text" (a string or list), else the .txt lines."""
    if "json" in files:
        meta = json.loads(files["json"].decode("utf-8"))
        for key in ("caption", "captions", "text"):
            if isinstance(meta, dict) and key in meta:
                value = meta[key]
                return value if isinstance(value, list) else [value]
    if "txt" in files:
        return [line for line in files["txt"].decode("utf-8").splitlines() if line.strip()]
    return []


def member_key(name: str) -> tuple[str, str]:
    """(sample key, extension) of a tar member, as webdataset splits them: at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample: consecutive members with one key, as webdataset groups them."""
    key, files = None, {}
    with tarfile.open(shard) as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, extension = member_key(member.name)
            if stem != key and files:
                yield key, files
                files = {}
            key = stem
            files[extension] = tar.extractfile(member).read()
    if files:
        yield key, files


def read_wds(source: Source) -> Iterator[Record]:
    out = source.work_dir / "images"
    for shard in shard_paths(source.input):
        try:
            for key, files in samples(shard):
                where = f"{shard}, sample {key}"
                extension = next((e for e in IMAGE_EXTENSIONS if e in files), None)
                if extension is None:
                    source.problems.add(where, f"no image member (.{', .'.join(IMAGE_EXTENSIONS)}); has {sorted(files)}")
                    continue
                try:
                    texts = sample_captions(files)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    source.problems.add(where, f"caption file unreadable ({e})")
                    continue
                path = out / shard.stem / f"{Path(key).name}.{'jpg' if extension == 'jpeg' else extension}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(files[extension])
                yield Record(path, source.captions(texts, where), None, where)
        except tarfile.TarError as e:
            source.problems.add(str(shard), f"not a readable tar file ({e})")


def is_shard_source(path: str) -> bool:
    """Whether datasets_train_json_path names shards: a brace pattern, a .tar, or a list file of shards."""
    text = str(path)
    return text.endswith(".tar") or ("{" in text and ".tar" in text) or text.endswith((".shards", ".shardlist"))
