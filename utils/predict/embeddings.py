"""An embeddings folder (what mode="embed" writes, in clip-retrieval's layout): `img_emb/img_emb_N.npy`,
`text_emb/text_emb_N.npy` when captions were embedded, `metadata/metadata_N.parquet` (written last: its presence says
part N is complete). Written part by part here, and verified and read part by part for the index and the search.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.files import atomic_write_bytes

PART_FILES = {"img_emb": ".npy", "text_emb": ".npy", "metadata": ".parquet"}


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def part_paths(out: str | Path, name: str) -> dict[str, Path]:
    """The files of part `name` of an embeddings folder, by kind: the only place their names are spelled."""
    out = Path(out)
    return {kind: out / kind / f"{kind}_{name}{suffix}" for kind, suffix in PART_FILES.items()}


def part_names(root: str | Path, complete: bool = False) -> list[str]:
    """Names of the parts with any file in `root` (with `complete`, only those whose metadata, written last, is
    there), in numeric order."""
    names = set()
    for kind, suffix in PART_FILES.items():
        if complete and kind != "metadata":
            continue
        for path in (Path(root) / kind).glob(f"{kind}_*{suffix}"):
            name = path.name[len(kind) + 1:-len(suffix)]
            if name.isdigit():
                names.add(name)
    return sorted(names, key=lambda name: (int(name), name))


def remove_part(out: str | Path, name: str) -> None:
    for path in part_paths(out, name).values():
        path.unlink(missing_ok=True)


def write_part(out: str | Path, name: str, images: np.ndarray, texts: np.ndarray | None, columns: dict[str, list],
               notes: dict | None = None) -> None:
    """One part's files, each atomically, the metadata last: its presence says the part is complete. `notes`
    (unreadable images, ...) travel in the parquet file's key-value metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = part_paths(out, name)
    for key in ("img_emb", "metadata") + (("text_emb",) if texts is not None else ()):
        paths[key].parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(_npy_bytes(images), paths["img_emb"])
    if texts is not None:
        atomic_write_bytes(_npy_bytes(texts), paths["text_emb"])
    table = pa.table({k: pa.array(v, type=pa.string() if k in ("image_path", "caption", "shard") else None)
                      for k, v in columns.items()})
    if notes:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               b"clip_embed": json.dumps(notes).encode("utf-8")})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(buffer.getvalue(), paths["metadata"])


def part_done(out: str | Path, name: str, text: bool) -> bool:
    paths = part_paths(out, name)
    return paths["metadata"].is_file() and paths["img_emb"].is_file() and (not text or paths["text_emb"].is_file())


def part_notes(path: Path) -> dict:
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(b"clip_embed")
    return json.loads(raw) if raw else {}


def embeddings_fix(root: str | Path) -> str:
    """What rebuilds a damaged part of the embeddings folder `root`."""
    if (Path(root) / "embed.json").is_file():
        return (f"delete that part's files and rerun the --mode embed command that wrote {root} (it writes only the "
                "missing parts)")
    return f"write the embeddings folder {root} again"


def _npy_shape(path: Path, fix: str) -> tuple[int, ...]:
    """The shape of the array in a .npy file, checked against the file's size without reading the data."""
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            header = f.tell()
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a .npy array ({e}); {fix}") from e
    expected, size = header + math.prod(shape) * dtype.itemsize, path.stat().st_size
    if size < expected or len(shape) != 2 or dtype.kind != "f":
        what = (f"is truncated ({size:,} of {expected:,} bytes)" if size < expected
                else f"holds a {dtype} array of shape {shape}, not rows of floats")
        raise UserError(f"{path} {what}; {fix}")
    return shape


def check_part(root: Path, name: str, fix: str) -> tuple[int, int, bool]:
    """(rows, width, has text rows) of a part whose files agree, else one line naming the file that does not."""
    import pyarrow.parquet as pq

    paths = part_paths(root, name)
    for kind in ("img_emb", "metadata"):
        if not paths[kind].is_file():
            raise UserError(f"{paths[kind]} is missing (its part was interrupted, or the file deleted); {fix}")
    rows, width = _npy_shape(paths["img_emb"], fix)
    try:
        listed = pq.read_metadata(paths["metadata"]).num_rows
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise UserError(f"{paths['metadata']} is unreadable ({type(e).__name__}: {e}); {fix}") from e
    text = paths["text_emb"].is_file()
    for kind, count in (("img_emb", rows), ("text_emb", _npy_shape(paths["text_emb"], fix)[0] if text else rows)):
        if count != listed:
            raise UserError(f"{paths[kind]} holds {count:,} rows where {paths['metadata'].name} lists {listed:,}; "
                            f"{fix}")
    return rows, width, text


@dataclass
class Embeddings:
    """An embeddings folder in clip-retrieval's layout, verified part by part and read part by part (the arrays
    memory-mapped)."""
    root: Path
    names: list[str]
    rows: list[int]
    dim: int
    text: bool = False  # every part has caption vectors, row-aligned with its images

    @classmethod
    def open(cls, root: str | Path, names: list[str] | None = None, fix: str = "") -> "Embeddings":
        """Parts `names` (default: every part there, all of which must be complete) in that order, each checked:
        its files present, whole and of one row count; a damaged one is a UserError naming it and `fix`."""
        root = Path(root)
        fix = fix or embeddings_fix(root)
        names = part_names(root) if names is None else list(names)
        if not names:
            raise UserError(f"{root} holds no embeddings (img_emb/img_emb_N.npy with metadata/metadata_N.parquet); "
                            "make them with --mode embed")
        checked = [check_part(root, name, fix) for name in names]
        dims = {width for rows, width, _ in checked if rows}
        if len(dims) > 1:
            raise UserError(f"{root}/img_emb holds arrays of different widths ({sorted(dims)}); they are not one "
                            "embeddings folder")
        return cls(root, names, [rows for rows, _, _ in checked], dims.pop() if dims else 0,
                   all(text for _, _, text in checked))

    @property
    def total(self) -> int:
        return sum(self.rows)

    @property
    def starts(self) -> list[int]:
        return [0] + list(np.cumsum(self.rows)[:-1])

    def vectors(self, part: int, kind: str = "img_emb") -> np.ndarray:
        return np.load(part_paths(self.root, self.names[part])[kind], mmap_mode="r")

    def column(self, part: int, name: str) -> list:
        import pyarrow.parquet as pq

        return pq.read_table(part_paths(self.root, self.names[part])["metadata"], columns=[name]).column(name).to_pylist()

    def kept(self, part: int) -> np.ndarray:
        """Rows to index: the first of each run of rows naming one image (its caption rows repeat its vector)."""
        paths = self.column(part, "image_path")
        return np.array([i for i in range(len(paths)) if i == 0 or paths[i] != paths[i - 1]], dtype=np.int64)

    def rows_at(self, ids: np.ndarray, kind: str = "img_emb") -> np.ndarray:
        """float32 vectors (`kind` "text_emb": the caption vectors) of global row ids, in the order given."""
        ids = np.asarray(ids, dtype=np.int64)
        parts = np.searchsorted(np.array(self.starts), ids, side="right") - 1
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for part in np.unique(parts):
            where = np.nonzero(parts == part)[0]
            out[where] = self.vectors(int(part), kind)[ids[where] - self.starts[part]]
        return out
