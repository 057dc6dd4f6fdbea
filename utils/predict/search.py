"""mode="search": a folder's image features kept up to date incrementally, or an index built by mode "index".

A folder search keeps its index in index_dir in utils/predict/index.py's format with the embeddings inside:
`img_emb/`, `metadata/` (each image's path relative to the folder, size and modification time) and `index.json`.
An update encodes only new or changed images and writes them as one new part; the rows of changed and deleted
images are listed as removed. Nothing already written is rewritten but the small index.json. Queries are
answered by an exact FAISS inner-product index over the live rows.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from utils.data.images import IMAGE_SUFFIXES, image_files
from utils.errors import UserError
from utils.eval.feature_cache import hash_weights
from utils.predict.ask import ask_loop
from utils.predict.index import FORMAT, MANIFEST, Embeddings, VectorIndex, read_manifest, write_manifest
from utils.tokenizer import truncated

CHUNK = 65536
PART_WIDTH = 5  # fixed, so that name order is part order for readers that sort names (embedding_reader)


def model_identity(model_path: str, phi: str) -> str:
    """What the features depend on: the weights' bytes (sha256) and the architecture."""
    if not model_path:
        return f"random:{phi}"
    h = hashlib.sha256(phi.encode())
    hash_weights(h, model_path)
    return h.hexdigest()[:32]


class SearchIndex:
    def __init__(self, index_dir: str | Path, model_id: str, rebuild: bool = False):
        self.dir = Path(index_dir)
        self.model_id = model_id
        self.paths: list[str] = []
        self.stats: list[tuple[int, int]] = []
        self.features = torch.zeros(0, 0)
        self._where: list[tuple[str, int]] = []  # (part, row) of each live path
        self._parts: list[str] = []
        self._removed: dict[str, list[int]] = {}
        self._exact = None
        if (self.dir / "embed.json").is_file():  # never take (and delete) what mode "embed" wrote for an index
            raise UserError(f"index_dir {self.dir} holds embeddings written by mode \"embed\"; index them with "
                            f"--mode index --embeddings_dir {self.dir} --index_dir <a new folder>, or choose another "
                            "index_dir")
        if rebuild or not (self.dir / MANIFEST).is_file():
            self._forget_files(keep_parts=[])
            return
        try:
            manifest = read_manifest(self.dir)
            if manifest is None:
                raise ValueError("an older format")
            if manifest.get("model") != model_id:
                raise UserError(f"the index in {self.dir} was made with other weights or another phi; searching "
                                "it with this model would return nonsense. Pass --rebuild_index true to re-encode "
                                "the folder, or choose another index_dir")
            self._load(manifest)
        except UserError:
            raise
        except Exception as e:  # a damaged index is only a cache of features
            print(f"index in {self.dir} is unreadable ({type(e).__name__}: {e}); rebuilding it")
            self.__init__(index_dir, model_id, rebuild=True)

    def _forget_files(self, keep_parts: list[str]) -> None:
        """Delete this index's own files other than `keep_parts` (a rebuild, or the previous format's files)."""
        for name in ("features.safetensors",):
            (self.dir / name).unlink(missing_ok=True)
        for folder, prefix, suffix in (("img_emb", "img_emb_", ".npy"), ("metadata", "metadata_", ".parquet")):
            for path in (self.dir / folder).glob(f"{prefix}*{suffix}"):
                if path.name[len(prefix):-len(suffix)] not in keep_parts:
                    path.unlink()

    def _load(self, manifest: dict) -> None:
        self._parts = list(manifest["parts"])
        self._removed = {k: list(v) for k, v in manifest.get("removed", {}).items()}
        if not self._parts:
            return
        emb = Embeddings.open(self.dir, self._parts)
        rows = []
        for part, name in enumerate(emb.names):
            gone = set(self._removed.get(name, []))
            paths, sizes, times = (emb.column(part, c) for c in ("image_path", "size", "mtime_ns"))
            vectors = emb.vectors(part)
            for row in range(len(paths)):
                if row not in gone:
                    self.paths.append(paths[row])
                    self.stats.append((sizes[row], times[row]))
                    self._where.append((name, row))
                    rows.append(np.asarray(vectors[row], dtype=np.float32))
        self.features = torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, 0)

    def update(self, folder: str | Path, encode: Callable[[list[Path]], torch.Tensor]) -> dict[str, int]:
        """Index every image under `folder`: new and changed ones are encoded (`encode(paths)` returns their
        unit features), deleted ones dropped. Returns the counts of each and of the images kept."""
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"dir_origin_path {folder} is not a folder")
        current = {}
        root = folder.resolve()
        # A symlink out of the folder is not the folder's: the web page would refuse to show it.
        for path in (p for p in image_files(folder) if root in p.resolve().parents):
            stat = path.stat()
            current[path.relative_to(folder).as_posix()] = (stat.st_size, stat.st_mtime_ns)
        known = {p: (i, s) for i, (p, s) in enumerate(zip(self.paths, self.stats))}
        kept = [p for p in current if p in known and known[p][1] == current[p]]
        changed = [p for p in current if p in known and known[p][1] != current[p]]
        new = [p for p in current if p not in known]
        removed = [p for p in known if p not in current]
        to_encode = changed + new
        encoded, unreadable = encode([folder / p for p in to_encode]) if to_encode else (torch.zeros(0, 0), [])
        failed = {Path(path).relative_to(folder).as_posix() for path in unreadable}
        added = [p for p in to_encode if p not in failed]
        for p in changed + removed:
            name, row = self._where[known[p][0]]
            self._removed.setdefault(name, []).append(row)
        keep = [known[p][0] for p in kept]
        where = [self._where[i] for i in keep]
        if added:
            from utils.predict.index import write_part

            name = str(max((int(n) for n in self._parts), default=-1) + 1).zfill(PART_WIDTH)
            vectors = encoded.float().numpy()
            write_part(self.dir, name, vectors, None, {"image_path": added, "size": [current[p][0] for p in added],
                                                        "mtime_ns": [current[p][1] for p in added]})
            self._parts.append(name)
            where += [(name, row) for row in range(len(added))]
        rows = [self.features[i] for i in keep] + list(encoded.float())
        self.paths, self.stats, self._where = kept + added, [current[p] for p in kept + added], where
        self.features = torch.stack(rows).float() if rows else torch.zeros(0, 0)
        self._exact = None
        self.save(folder)
        return {"new": len([p for p in new if p not in failed]), "changed": len([p for p in changed if p not in failed]),
                "removed": len(removed), "kept": len(kept), "unreadable": len(failed)}

    def save(self, folder: Path) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        live = {name for name, _ in self._where}
        # A part none of whose rows is live any more goes, with its removed list.
        gone = [name for name in self._parts if name not in live]
        self._parts = [name for name in self._parts if name in live]
        self._removed = {name: sorted(rows) for name, rows in self._removed.items() if name in live}
        write_manifest(self.dir, {"format": FORMAT, "embeddings_dir": ".", "key": "Flat",
                                  "dim": int(self.features.shape[1]) if len(self.features) else 0,
                                  "parts": self._parts, "removed": self._removed, "model": self.model_id,
                                  "folder": str(folder)})
        for name in gone:
            (self.dir / "img_emb" / f"img_emb_{name}.npy").unlink(missing_ok=True)
            (self.dir / "metadata" / f"metadata_{name}.parquet").unlink(missing_ok=True)

    def query(self, vector: torch.Tensor, k: int = 10) -> list[tuple[str, float]]:
        """The k indexed images most similar (cosine) to a unit `vector`, best first, exactly."""
        if not self.paths:
            return []
        if self._exact is None:
            import faiss

            self._exact = faiss.IndexFlatIP(self.features.shape[1])
            self._exact.add(np.ascontiguousarray(self.features.numpy(), dtype=np.float32))
        scores, rows = self._exact.search(np.asarray(vector, dtype=np.float32).reshape(1, -1), min(k, len(self.paths)))
        return [(self.paths[i], float(s)) for s, i in zip(scores[0], rows[0]) if i >= 0]


class BuiltIndex:
    """An index built by mode "index", answering as SearchIndex does: paths relative to the embedded folder
    (`folder`, for the web page's images) where they lie in it, else as the embeddings record them."""

    def __init__(self, index_dir: str | Path, model_id: str | None = None):
        self.index = VectorIndex(index_dir)
        recorded = self.index.manifest.get("model")
        if model_id is not None and recorded is not None and recorded != model_id:
            raise UserError(f"the index in {index_dir} was built from embeddings of other weights or another phi; "
                            "pass the model_path and phi they were made with")
        self.folder = Path(self.index.manifest["root"]) if self.index.manifest.get("root") else None

    def _shown(self, path: str) -> str:
        if self.folder is not None:
            try:
                return Path(path).resolve().relative_to(self.folder).as_posix()
            except ValueError:
                pass
        return path

    def query(self, vector: torch.Tensor, k: int = 10) -> list[tuple[str, float]]:
        found = self.index.search(np.asarray(vector, dtype=np.float32).reshape(1, -1), k)[0]
        return [(self._shown(self.index.path(row)), score) for row, score in found]


def open_index(model, config: dict):
    """(index, folder its paths are relative to, a line saying what was indexed) for search and web: an index
    built by mode "index" in index_dir is answered from as it is; otherwise dir_origin_path is (re)indexed there."""
    manifest = read_manifest(config["index_dir"])
    identity = model_identity(model.weights_path or "", model.phi)
    if manifest is not None and manifest.get("embeddings_dir") != ".":
        index = BuiltIndex(config["index_dir"], identity)
        return index, index.folder, (f"index {config['index_dir']}: {index.index.size:,} images "
                                     f"({index.index.key} over {manifest['embeddings_dir']})")
    folder = Path(config["dir_origin_path"])
    index = SearchIndex(config["index_dir"], identity, config["rebuild_index"])
    counts = index.update(folder, encode_paths(model, config["batch_size"]))
    return index, folder, (f"index {config['index_dir']}: {len(index.paths)} images ({counts['new']} new, "
                           f"{counts['changed']} changed re-encoded, {counts['removed']} removed, "
                           f"{counts['unreadable']} unreadable left out)")


@torch.no_grad()
def top_k(features: torch.Tensor, vector: torch.Tensor, k: int) -> tuple[list[float], list[int]]:
    """(scores, rows) of the k rows of `features` with the largest dot product with `vector`, in chunks."""
    vector = vector.reshape(-1).to(features.dtype)
    best_scores, best_rows = torch.empty(0), torch.empty(0, dtype=torch.long)
    for start in range(0, len(features), CHUNK):
        scores = features[start:start + CHUNK] @ vector
        top = scores.topk(min(k, len(scores)))
        best_scores = torch.cat([best_scores, top.values])
        best_rows = torch.cat([best_rows, top.indices + start])
    order = best_scores.topk(min(k, len(best_scores))).indices
    return best_scores[order].tolist(), best_rows[order].tolist()


def encode_paths(model, batch_size: int = 32, threads: int | None = None
                 ) -> Callable[[Sequence[Path]], tuple[torch.Tensor, list[Path]]]:
    """paths -> (unit features of the readable ones, in order, on the CPU; the unreadable paths), through
    model.pipeline (`threads` decode ahead; None: one per core, at most 4)."""
    def encode(paths: Sequence[Path]) -> tuple[torch.Tensor, list[Path]]:
        encoding = model.pipeline.encode(list(paths), batch_size, threads)
        return encoding.all()[0].cpu(), [Path(name) for name, _ in encoding.unreadable]

    return encode


def _query_vector(model, text: str) -> tuple[torch.Tensor, str]:
    """A query's unit vector: an existing image file is searched by example, anything else as text."""
    import torch.nn.functional as F

    path = Path(text)
    if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
        try:
            image = model.open_image(path)
        except Exception as e:  # unreadable: say so, then search nothing
            raise UserError(f"cannot open {text!r} ({type(e).__name__}: {e})") from e
        return F.normalize(model.detect_image_for_eval(images=[image])[0].float(), dim=-1)[0].cpu(), "image"
    return F.normalize(model.detect_image_for_eval(texts=[text])[1].float(), dim=-1)[0].cpu(), "text"


def run_search(model, config: dict) -> None:
    index, folder, line = open_index(model, config)
    print(line)

    def answer(text: str) -> None:
        vector, kind = _query_vector(model, text)
        if kind == "text" and truncated(model.tokenizer, text):
            print(f"the query is longer than the text tower's {model.tokenizer.context_length} tokens: "
                  "only its start is searched")
        for path, score in index.query(vector, config["top_k"]):
            print(f"{score:.4f}  {folder / path if folder is not None else path}")

    if config["query"]:
        answer(config["query"])
        return
    def answer_or_why(text: str) -> str | None:
        try:
            answer(text)
        except UserError as e:
            return str(e)
        return None

    ask_loop("Search (text, or an image path): ", answer_or_why)
