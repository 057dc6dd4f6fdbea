"""mode="search": a folder's image features kept up to date incrementally, or an index built by mode "index".

A folder search is an index of utils/predict/index.py's format with the embeddings inside index_dir: `img_emb/`,
`metadata/` (each image's path relative to the folder, size and modification time) and `index.json`, opened (and
verified) by its VectorIndex as a Flat index. What this module adds is the incremental part writer: an update
encodes only new or changed images and writes them as one new part; the rows of changed and deleted images are
listed as removed. Nothing already written is rewritten but the small index.json.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from utils.data.images import IMAGE_SUFFIXES, image_files
from utils.errors import UserError
from utils.eval.feature_cache import model_identity
from utils.predict.ask import ask_loop
from utils.predict.embeddings import part_names, remove_part, write_part
from utils.predict.index import (FORMAT, VectorIndex, is_built_index, read_manifest, refuse_foreign_folder,
                                 write_manifest)
from utils.tokenizer import truncated

PART_WIDTH = 5  # fixed, so that name order is part order for readers that sort names (embedding_reader)


class SearchIndex:
    """A folder search: a Flat VectorIndex over the parts kept in index_dir, and the writer that grows it by a
    part per update. Only a new or empty folder, or one holding a folder search of these weights, is taken."""

    def __init__(self, index_dir: str | Path, model_id: str, rebuild: bool = False):
        self.dir = Path(index_dir)
        self.model_id = model_id
        manifest = read_manifest(self.dir, older=rebuild)
        if manifest is None:
            refuse_foreign_folder(self.dir, "a folder search")
        elif manifest.get("embeddings_dir") != ".":
            raise UserError(f"index_dir {self.dir} holds an index built by mode \"index\"; search it without "
                            "--dir_origin_path, or choose another index_dir for a folder search")
        elif rebuild:
            for name in part_names(self.dir):
                remove_part(self.dir, name)
            manifest = None
        elif manifest.get("model") != model_id:
            raise UserError(f"the index in {self.dir} was made with other weights or another phi; searching "
                            "it with this model would return nonsense. Pass --rebuild_index true to re-encode "
                            "the folder, or choose another index_dir")
        self._open(manifest)

    def _open(self, manifest: dict | None) -> None:
        """Read the live rows' paths, sizes and times; the vectors stay in the (verified) VectorIndex."""
        self.paths: list[str] = []
        self.stats: list[tuple[int, int]] = []
        self._where: list[tuple[str, int]] = []  # (part, row) of each live path
        self._removed = {k: list(v) for k, v in (manifest or {}).get("removed", {}).items()}
        self.index = VectorIndex(self.dir) if manifest is not None and manifest.get("parts") else None
        if self.index is None:
            return
        emb = self.index.emb
        for part, name in enumerate(emb.names):
            gone = set(self._removed.get(name, []))
            paths, sizes, times = (emb.column(part, c) for c in ("image_path", "size", "mtime_ns"))
            for row in range(len(paths)):
                if row not in gone:
                    self.paths.append(paths[row])
                    self.stats.append((sizes[row], times[row]))
                    self._where.append((name, row))

    def update(self, folder: str | Path, encode: Callable[[list[Path]], tuple[torch.Tensor, list[Path]]]
               ) -> dict[str, int]:
        """Index every image under `folder`: new and changed ones are encoded (`encode(paths)` returns the unit
        features of the readable ones and the unreadable paths), deleted ones dropped. Returns the counts of each
        and of the images kept."""
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
        parts = dict(self.index.manifest["parts"]) if self.index is not None else {}
        for p in changed + removed:
            name, row = self._where[known[p][0]]
            self._removed.setdefault(name, []).append(row)
        live = {self._where[known[p][0]][0] for p in kept}
        for name in part_names(self.dir):
            if name not in parts:  # written by an update that was interrupted before its manifest
                remove_part(self.dir, name)
        if added:
            name = str(max((int(n) for n in parts), default=-1) + 1).zfill(PART_WIDTH)
            write_part(self.dir, name, encoded.float().numpy(), None, {
                "image_path": added, "size": [current[p][0] for p in added],
                "mtime_ns": [current[p][1] for p in added]})
            parts[name] = len(added)
            live.add(name)
        if added or changed or removed or self.index is None:
            self._save(folder, {name: rows for name, rows in parts.items() if name in live},
                       int(encoded.shape[1]) if added else (self.index.manifest["dim"] if self.index else 0))
        return {"new": len([p for p in new if p not in failed]), "changed": len([p for p in changed if p not in failed]),
                "removed": len(removed), "kept": len(kept), "unreadable": len(failed)}

    def _save(self, folder: Path, parts: dict[str, int], dim: int) -> None:
        """The manifest of the live parts, then the files of parts none of whose rows is live any more."""
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "embeddings_dir": ".", "key": "Flat", "dim": dim, "parts": parts,
                    "removed": {name: sorted(rows) for name, rows in self._removed.items() if name in parts},
                    "params": {}, "model": self.model_id, "folder": str(folder.resolve())}
        write_manifest(self.dir, manifest)
        for name in part_names(self.dir):
            if name not in parts:
                remove_part(self.dir, name)
        self._open(manifest)

    def query(self, vector: torch.Tensor, k: int = 10) -> list[tuple[str, float]]:
        """The k indexed images most similar (cosine) to a unit `vector`, best first, exactly: (path relative to
        the folder, score)."""
        return self.index.query(vector, k) if self.index is not None and self.paths else []


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
        return [(self._shown(path), score) for path, score in self.index.query(vector, k)]


def open_index(model, config: dict):
    """(index, folder its paths are relative to, a line saying what was indexed) for search and web: an index
    built by mode "index" in index_dir is answered from as it is; otherwise dir_origin_path is (re)indexed there
    (utils/predict/inputs.search_inputs has checked that the user asked for that)."""
    identity = model_identity(model.weights_path or "", model.phi)
    if is_built_index(config["index_dir"]):
        index = BuiltIndex(config["index_dir"], identity)
        return index, index.folder, (f"index {config['index_dir']}: {index.index.size:,} images "
                                     f"({index.index.key} over {index.index.manifest['embeddings_dir']})")
    folder = Path(config["dir_origin_path"])
    index = SearchIndex(config["index_dir"], identity, config["rebuild_index"])
    counts = index.update(folder, encode_paths(model, config["batch_size"]))
    return index, folder, (f"index {config['index_dir']}: {len(index.paths)} images ({counts['new']} new, "
                           f"{counts['changed']} changed re-encoded, {counts['removed']} removed, "
                           f"{counts['unreadable']} unreadable left out)")


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
