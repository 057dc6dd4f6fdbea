"""mode="index": a FAISS index over an embeddings folder, sized to a memory budget, and the searches answered from it.

On disk an index is a folder: `index.json` (which embeddings folder and parts it covers, the FAISS index_factory
key, the search setting tuned at build time, rows removed since, the build report) and, for the approximate
kinds, `knn.index` (FAISS's own format). An exact `Flat` index keeps no file of its own: its vectors are the
embeddings parts, read back in seconds. Ids are row numbers in the embeddings folder, parts in name order,
so an id is also its metadata row. Parts added to the embeddings folder after the build are added when the
index is opened; a folder search (utils/predict/search.py) is this format with the embeddings inside the index
folder, grown by one part per update.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.files import atomic_write_bytes, human_size
from utils.errors import UserError

MANIFEST = "index.json"
INDEX_FILE = "knn.index"
FORMAT = "clip-index/1"
# Exact search while the vectors take at most half the budget and number at most this many: a query then scans
# 100,000 x 512 floats (about 20 ms on 2 cores); above it an IVF answers in a few ms at recall@10 >= 0.95.
FLAT_MAX = 100_000
# The search setting (nprobe, efSearch) is the smallest whose recall@10 on held-out vectors reaches this.
TARGET_RECALL = 0.95
# Product-quantiser sizes tried, most precise first (bytes per vector; each must divide the dimension).
PQ_SIZES = (256, 128, 64, 48, 32, 24, 16, 8, 4)
KINDS = ("auto", "Flat", "HNSW", "IVF", "IVFPQ")


def parse_memory(text: str | int) -> int:
    """Bytes in "4G", "500M", "1.5GB", "2GiB", "800k" or a plain number (powers of 1024, as autofaiss reads them)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not match:
        raise UserError(f"index_memory {text!r} is not a size such as \"4G\", \"500M\" or \"2GiB\"")
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " "))


def n_lists(n: int) -> int:
    """IVF lists: a power of two near 4 sqrt(n), FAISS's guideline (4 to 16 sqrt(n)) as autofaiss takes it, and at
    most n / 39 (k-means wants 39 points per centroid). Measured at 1M x 512-d from 10,000 clusters: 1,024 lists
    needed nprobe=128 (15.5 ms a query) for recall@10 0.95, 4,096 lists reached 0.99 at nprobe=1 (0.16 ms); the
    price is k-means over 4x the centroids (121 s against 33 s to build on 2 cores)."""
    return int(max(1, min(2 ** round(math.log2(max(1.0, 4 * math.sqrt(n)))), n // 39 or 1)))


def index_bytes(key: str, n: int, d: int) -> int:
    """Estimated memory of index `key` holding n vectors of dimension d (ids are 8 bytes each)."""
    ivf = re.match(r"IVF(\d+)", key)
    coarse = int(ivf.group(1)) * d * 4 if ivf else 0
    if (pq := re.search(r"PQ(\d+)", key)):
        m = int(pq.group(1))
        return n * (m + 8) + coarse + 256 * d * 4
    if (hnsw := re.match(r"HNSW(\d+)", key)):
        return n * (4 * d + 8 * int(hnsw.group(1)) + 8)
    return n * (4 * d + 8) + coarse


def choose_key(n: int, d: int, memory: int, kind: str = "auto") -> str:
    """The FAISS index_factory key for n vectors of dimension d within `memory` bytes, or the kind asked for.

    After autofaiss's rule (exact for few vectors, HNSW where its links fit, IVF while full vectors fit,
    else IVF with product quantisation as fine as the budget allows), except that HNSW is not chosen on its own:
    its build inserts ~400 vectors/s per CPU core at 512-d (measured here), most of an hour for a million, where an
    IVF builds in two minutes and answers as fast. `kind` "HNSW" asks for it anyway."""
    if kind not in KINDS:
        return kind  # a FAISS index_factory string, taken as it is
    nlist = n_lists(n)
    coarse = f"IVF{nlist}" + ("_HNSW32" if nlist >= 16384 else "")
    keys = {"Flat": "Flat", "HNSW": "HNSW32", "IVF": f"{coarse},Flat"}
    if kind in keys:
        return keys[kind]
    fitting = [m for m in PQ_SIZES if m < d and d % m == 0 and index_bytes(f"{coarse},PQ{m}", n, d) <= memory]
    if kind == "IVFPQ":
        return f"{coarse},PQ{fitting[0] if fitting else min(m for m in PQ_SIZES if d % m == 0)}"
    if n <= FLAT_MAX and index_bytes("Flat", n, d) <= memory / 2:
        return "Flat"
    if index_bytes(keys["IVF"], n, d) <= memory:
        return keys["IVF"]
    if fitting:
        return f"{coarse},PQ{fitting[0]}"
    smallest = index_bytes(f"{coarse},PQ4", n, d)
    raise UserError(f"index_memory {human_size(memory)} cannot hold {n:,} vectors: the smallest index (PQ4) needs "
                    f"{human_size(smallest)}; raise index_memory")


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def part_paths(out: str | Path, name: str) -> dict[str, Path]:
    out = Path(out)
    return {"img_emb": out / "img_emb" / f"img_emb_{name}.npy", "text_emb": out / "text_emb" / f"text_emb_{name}.npy",
            "metadata": out / "metadata" / f"metadata_{name}.parquet"}


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


@dataclass
class Embeddings:
    """An embeddings folder in clip-retrieval's layout, read part by part (the arrays memory-mapped)."""
    root: Path
    names: list[str]
    rows: list[int]
    dim: int

    @classmethod
    def open(cls, root: str | Path, names: list[str] | None = None) -> "Embeddings":
        root = Path(root)
        found = sorted((int(p.stem.rsplit("_", 1)[1]), p.stem.rsplit("_", 1)[1])
                       for p in (root / "img_emb").glob("img_emb_*.npy") if p.stem.rsplit("_", 1)[1].isdigit())
        names = [name for _, name in found] if names is None else names
        names = [name for name in names if (root / "metadata" / f"metadata_{name}.parquet").is_file()]
        if not names:
            raise UserError(f"{root} holds no embeddings (img_emb/img_emb_N.npy with metadata/metadata_N.parquet); "
                            "make them with --mode embed")
        arrays = [np.load(root / "img_emb" / f"img_emb_{name}.npy", mmap_mode="r") for name in names]
        dims = {a.shape[1] for a in arrays if a.ndim == 2 and len(a)}
        if len(dims) > 1 or any(a.ndim != 2 for a in arrays):
            raise UserError(f"{root}/img_emb holds arrays of different widths ({sorted(dims)}); they are not one "
                            "embeddings folder")
        return cls(root, names, [len(a) for a in arrays], dims.pop() if dims else 0)

    @property
    def total(self) -> int:
        return sum(self.rows)

    @property
    def starts(self) -> list[int]:
        return [0] + list(np.cumsum(self.rows)[:-1])

    def vectors(self, part: int) -> np.ndarray:
        return np.load(self.root / "img_emb" / f"img_emb_{self.names[part]}.npy", mmap_mode="r")

    def column(self, part: int, name: str) -> list:
        import pyarrow.parquet as pq

        return pq.read_table(self.root / "metadata" / f"metadata_{self.names[part]}.parquet",
                             columns=[name]).column(name).to_pylist()

    def kept(self, part: int) -> np.ndarray:
        """Rows to index: the first of each run of rows naming one image (its caption rows repeat its vector)."""
        paths = self.column(part, "image_path")
        return np.array([i for i in range(len(paths)) if i == 0 or paths[i] != paths[i - 1]], dtype=np.int64)

    def rows_at(self, ids: np.ndarray) -> np.ndarray:
        """float32 vectors of global row ids, in the order given."""
        ids = np.asarray(ids, dtype=np.int64)
        parts = np.searchsorted(np.array(self.starts), ids, side="right") - 1
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for part in np.unique(parts):
            where = np.nonzero(parts == part)[0]
            out[where] = self.vectors(int(part))[ids[where] - self.starts[part]]
        return out


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise UserError("the index needs FAISS: pip install faiss-cpu (or faiss-gpu)") from e
    return faiss


def new_index(key: str, d: int):
    faiss = _faiss()
    try:
        index = faiss.index_factory(d, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise UserError(f"index_type {key!r} is not a FAISS index_factory key this FAISS builds ({e})") from e
    # Ids are embeddings rows, which skip repeated images: IVF keeps ids itself, the others need the map.
    return index if "IVF" in key else faiss.IndexIDMap(index)


def search_params(index) -> tuple[str, list[int]]:
    """The knob that trades speed for recall on this index, and the values worth trying."""
    faiss = _faiss()
    if isinstance(index, faiss.IndexIDMap) and isinstance(faiss.downcast_index(index.index), faiss.IndexHNSW):
        return "efSearch", [16, 32, 64, 128, 256, 512]
    try:
        nlist = faiss.extract_index_ivf(index).nlist
    except RuntimeError:  # neither IVF nor HNSW: exact
        return "", []
    return "nprobe", [p for p in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512) if p <= nlist]


def set_param(index, name: str, value: int) -> None:
    faiss = _faiss()
    if name == "nprobe":
        faiss.extract_index_ivf(index).nprobe = value
    elif name == "efSearch":
        faiss.downcast_index(index.index).hnsw.efSearch = value


def exact_top(emb: Embeddings, queries: np.ndarray, k: int, kept: list[np.ndarray] | None = None,
              chunk: int = 65536) -> np.ndarray:
    """Ids of the k rows (of `kept`, each part's local rows; default all) with the largest inner product with each
    query, by brute force."""
    import torch

    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    best_scores = torch.full((len(q), 0), -float("inf"))
    best_ids = torch.zeros((len(q), 0), dtype=torch.long)
    for part, start in enumerate(emb.starts):
        vectors = emb.vectors(part)
        rows = np.arange(len(vectors)) if kept is None else kept[part]
        for s in range(0, len(rows), chunk):
            block = rows[s:s + chunk]
            scores = q @ torch.from_numpy(np.asarray(vectors[block], dtype=np.float32)).T
            top = scores.topk(min(k, scores.shape[1]), dim=1)
            best_scores = torch.cat([best_scores, top.values], dim=1)
            best_ids = torch.cat([best_ids, torch.from_numpy(block + start)[top.indices]], dim=1)
            keep = best_scores.topk(min(k, best_scores.shape[1]), dim=1).indices
            best_scores, best_ids = best_scores.gather(1, keep), best_ids.gather(1, keep)
    order = best_scores.argsort(dim=1, descending=True)
    return best_ids.gather(1, order).numpy()


def recall_at(found: np.ndarray, exact: np.ndarray, query_ids: np.ndarray, k: int = 10) -> float:
    """Mean share of each query's exact k nearest others (itself left out) that `found` lists among its k."""
    hits = wanted = 0
    for row, query in enumerate(query_ids):
        truth = [i for i in exact[row] if i != query][:k]
        got = [i for i in found[row] if i != query and i >= 0][:k]
        hits += len(set(truth) & set(got))
        wanted += len(truth)  # fewer than k when the index holds fewer than k others
    return hits / max(1, wanted)


def build(emb: Embeddings, key: str, queries: int = 1000, seed: int = 0, progress=print) -> tuple[object, dict]:
    """Build index `key` over `emb`'s kept rows; tune its search setting on `queries` held-out rows (not used
    to train it) against exact search. Returns (index, report)."""
    faiss = _faiss()
    started = time.perf_counter()
    local = [emb.kept(part) for part in range(len(emb.names))]
    ids = np.concatenate([rows + start for rows, start in zip(local, emb.starts)])
    rng = np.random.default_rng(seed)
    held_out = np.sort(rng.choice(ids, size=min(queries, len(ids)), replace=False))
    index = new_index(key, emb.dim)
    if not index.is_trained:
        ivf = faiss.extract_index_ivf(index)
        # 39 to 64 points per list, FAISS's range for k-means; the held-out rows stay out of training.
        pool = np.setdiff1d(ids, held_out) if len(ids) > len(held_out) else ids
        size = min(len(pool), 64 * ivf.nlist)
        if len(pool) < ivf.nlist:
            raise UserError(f"{key} needs at least {ivf.nlist} vectors to train; {emb.root} holds {len(pool)}")
        sample = np.sort(rng.choice(pool, size=size, replace=False))
        progress(f"training {key} on {size:,} vectors")
        index.train(emb.rows_at(sample))
    for part, rows in enumerate(local):
        vectors = emb.vectors(part)
        for s in range(0, len(rows), 100_000):
            chunk = rows[s:s + 100_000]
            index.add_with_ids(np.asarray(vectors[chunk], dtype=np.float32), chunk + emb.starts[part])
        progress(f"added part {emb.names[part]} ({index.ntotal:,} vectors)")
    build_seconds = time.perf_counter() - started
    report = {"key": key, "vectors": int(index.ntotal), "dim": emb.dim, "build_seconds": round(build_seconds, 2),
              "memory_bytes": memory_of(index)}
    progress(f"built in {build_seconds:.1f} s; tuning on {len(held_out)} held-out vectors")
    report.update(tune(index, emb, held_out, local))
    return index, report


def tune(index, emb: Embeddings, held_out: np.ndarray, kept: list[np.ndarray] | None = None, k: int = 10) -> dict:
    """Set the index's speed/recall knob to the smallest value reaching TARGET_RECALL on the held-out rows."""
    queries = emb.rows_at(held_out)
    exact = exact_top(emb, queries, k + 1, kept)
    name, values = search_params(index)
    chosen, recall = None, 0.0
    for value in values or [None]:
        if name:
            set_param(index, name, value)
        found = index.search(queries, k + 1)[1]
        chosen, recall = value, recall_at(found, exact, held_out, k)
        if recall >= TARGET_RECALL:
            break
    return {"params": {name: chosen} if name else {}, "recall_at_10": round(recall, 4), "held_out": len(held_out)}


def memory_of(index) -> int:
    """Bytes of the index as FAISS writes it, which is what it holds in memory."""
    faiss = _faiss()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "index")
        faiss.write_index(index, path)
        return os.path.getsize(path)


def ms_per_query(index, queries: np.ndarray, batch: int, k: int = 10) -> float:
    started = time.perf_counter()
    for s in range(0, len(queries), batch):
        index.search(queries[s:s + batch], k)
    return (time.perf_counter() - started) * 1000 / len(queries)


def write_manifest(index_dir: Path, manifest: dict) -> None:
    atomic_write_bytes(json.dumps(manifest, indent=1).encode("utf-8"), index_dir / MANIFEST)


def read_manifest(index_dir: str | Path) -> dict | None:
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}); rebuild the index (--rebuild_index true)") from e
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def is_built_index(index_dir: str | Path) -> bool:
    """Whether index_dir holds an index built by mode "index" (answered from as it is), rather than a folder
    search's own index (embeddings kept inside it, "." in the manifest) or nothing."""
    manifest = read_manifest(index_dir) if index_dir else None
    return manifest is not None and manifest.get("embeddings_dir") != "."


class VectorIndex:
    """An index folder opened for search: FAISS index, removed rows, and the metadata that names each id."""

    def __init__(self, index_dir: str | Path):
        faiss = _faiss()
        self.dir = Path(index_dir)
        manifest = read_manifest(self.dir)
        if manifest is None:
            raise UserError(f"{self.dir} holds no index; build one with --mode index --embeddings_dir E "
                            f"--index_dir {self.dir}")
        self.manifest = manifest
        source = manifest["embeddings_dir"]
        self.emb = Embeddings.open(self.dir if source == "." else Path(source))
        self.key = manifest["key"]
        covered = manifest.get("parts", [])
        if self.key == "Flat":
            self.index, covered = new_index("Flat", self.emb.dim), []
        else:
            self.index = faiss.read_index(str(self.dir / INDEX_FILE))
        for name, value in manifest.get("params", {}).items():
            set_param(self.index, name, value)
        # Parts written after the build (or every part, for Flat) join now: appending needs no retraining.
        for part, name in enumerate(self.emb.names):
            if name not in covered:
                rows = self.emb.kept(part)
                self.index.add_with_ids(np.asarray(self.emb.vectors(part)[rows], dtype=np.float32),
                                        rows + self.emb.starts[part])
        starts = dict(zip(self.emb.names, self.emb.starts))
        self.removed = {starts[name] + row for name, rows in manifest.get("removed", {}).items()
                        if name in starts for row in rows}
        self._paths: list | None = None

    @property
    def size(self) -> int:
        return int(self.index.ntotal) - len(self.removed)

    def path(self, row: int) -> str:
        if self._paths is None:
            self._paths = [p for part in range(len(self.emb.names)) for p in self.emb.column(part, "image_path")]
        return self._paths[row]

    def search(self, vectors: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """Per query (unit rows), the k best (row, score), best first; removed rows never appear."""
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        scores, ids = self.index.search(vectors, k + len(self.removed))
        return [[(int(i), float(s)) for s, i in zip(row_scores, row_ids) if i >= 0 and int(i) not in self.removed][:k]
                for row_scores, row_ids in zip(scores, ids)]


def run_index(config: dict) -> dict:
    """predict.py mode="index": build the index of embeddings_dir into index_dir and report on it."""
    faiss = _faiss()
    emb_dir, index_dir = Path(config["embeddings_dir"]), Path(config["index_dir"])
    memory = parse_memory(config["index_memory"])
    emb = Embeddings.open(emb_dir)
    existing = read_manifest(index_dir)
    if existing is None and index_dir.is_dir() and any(index_dir.iterdir()):
        raise UserError(f"index_dir {index_dir} is not empty and holds no index; choose an empty or new folder")
    if existing is not None and existing["embeddings_dir"] == "." :
        raise UserError(f"index_dir {index_dir} is a folder search index (--mode search --dir_origin_path); "
                        "choose another index_dir")
    n = sum(len(emb.kept(part)) for part in range(len(emb.names)))
    key = choose_key(n, emb.dim, memory, config["index_type"])
    print(f"{n:,} vectors of dimension {emb.dim} in {len(emb.names)} parts of {emb_dir} -> {key}")
    index, report = build(emb, key)
    index_dir.mkdir(parents=True, exist_ok=True)
    if key != "Flat":
        data = faiss.serialize_index(index)
        atomic_write_bytes(data.tobytes(), index_dir / INDEX_FILE)
    model = {}
    if (emb_dir / "embed.json").is_file():
        model = {k: v for k, v in json.loads((emb_dir / "embed.json").read_text(encoding="utf-8")).items()
                 if k in ("model", "phi", "root")}
    write_manifest(index_dir, {"format": FORMAT, "embeddings_dir": str(emb_dir.resolve()), "key": key,
                               "dim": emb.dim, "parts": emb.names, "params": report["params"], "removed": {},
                               **model, "report": report})
    params = ", ".join(f"{k}={v}" for k, v in report["params"].items())
    print(f"index {index_dir}: {key}{f' ({params})' if params else ''}, {report['vectors']:,} vectors, "
          f"{human_size(report['memory_bytes'])} in memory, built in {report['build_seconds']:.1f} s, recall@10 "
          f"{report['recall_at_10']:.3f} against exact search on {report['held_out']} held-out vectors")
    return report
