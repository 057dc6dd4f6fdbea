"""mode="search": an index of a folder's image features, kept up to date incrementally, searched exactly.

The index is a folder: `features.safetensors` (unit image features, float32, one row per image) and
`index.json` (the model it was made with, the indexed folder, and each image's path, size and modification
time). Updating re-encodes only new or changed images and drops deleted ones. Search is a matrix product in
chunks: exact, and fast enough at this scale that no approximate index is needed.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save

from utils.data.images import IMAGE_SUFFIXES, image_files
from utils.errors import UserError
from utils.eval.feature_cache import hash_weights
from utils.files import atomic_write_bytes
from utils.predict.ask import ask_loop

CHUNK = 65536


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
        meta_path = self.dir / "index.json"
        if meta_path.is_file() and not rebuild:
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                features = load_file(self.dir / "features.safetensors")["features"]
            except Exception as e:  # a damaged index is only a cache of features
                print(f"index in {self.dir} is unreadable ({type(e).__name__}); rebuilding it")
                return
            if meta.get("model") != model_id:
                raise UserError(f"the index in {self.dir} was made with other weights or another phi; searching it "
                                "with this model would return nonsense. Pass --rebuild_index true to re-encode "
                                "the folder, or choose another index_dir")
            self.paths = meta["paths"]
            self.stats = [tuple(s) for s in meta["stats"]]
            self.features = features

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
        removed = len([p for p in known if p not in current])
        to_encode = changed + new
        encoded, unreadable = encode([folder / p for p in to_encode]) if to_encode else (torch.zeros(0, 0), [])
        failed = {Path(path).relative_to(folder).as_posix() for path in unreadable}
        rows = [self.features[known[p][0]] for p in kept]
        order = kept + [p for p in to_encode if p not in failed]
        rows += [row for p, row in zip([p for p in to_encode if p not in failed], encoded)]
        self.paths, self.stats = order, [current[p] for p in order]
        self.features = torch.stack(rows).float() if rows else torch.zeros(0, 0)
        self.save(folder)
        return {"new": len([p for p in new if p not in failed]), "changed": len([p for p in changed if p not in failed]),
                "removed": removed, "kept": len(kept), "unreadable": len(failed)}

    def save(self, folder: Path) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(save({"features": self.features.contiguous()}), self.dir / "features.safetensors")
        meta = {"model": self.model_id, "folder": str(folder), "paths": self.paths, "stats": self.stats}
        atomic_write_bytes(json.dumps(meta).encode("utf-8"), self.dir / "index.json")

    def query(self, vector: torch.Tensor, k: int = 10) -> list[tuple[str, float]]:
        """The k indexed images most similar (cosine) to a unit `vector`, best first, exactly."""
        if not self.paths:
            return []
        return [(self.paths[i], s) for s, i in zip(*top_k(self.features, vector, k))]


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
    """paths -> (unit features of the readable ones, in order; the unreadable paths). `threads` decode the next
    batch while the model encodes this one (None: one per core, at most 4)."""
    import torch.nn.functional as F

    from utils.data.images import decode_ahead
    from utils.device import loader_workers
    from utils.predict.folder import loaded

    @torch.no_grad()
    def encode(paths: Sequence[Path]) -> tuple[torch.Tensor, list[Path]]:
        rows, failed = [], []
        dtype = next(model.net.parameters()).dtype
        for batch in decode_ahead(list(paths), lambda path: (path, loaded(model, path)[0]), batch_size,
                                  loader_workers(threads)):
            failed += [path for path, pixels in batch if pixels is None]  # unreadable: left out, counted
            pixels = [pixels for _, pixels in batch if pixels is not None]
            if pixels:
                batch = torch.stack(pixels).to(model.device, dtype)
                rows.append(F.normalize(model.net.encode_image(batch).float(), dim=-1).cpu())
        return (torch.cat(rows) if rows else torch.zeros(0, 0)), failed

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
    identity = model_identity(model.weights_path or "", model.phi)
    index = SearchIndex(config["index_dir"], identity, config["rebuild_index"])
    counts = index.update(config["dir_origin_path"], encode_paths(model, config["batch_size"]))
    print(f"index {config['index_dir']}: {len(index.paths)} images ({counts['new']} new, {counts['changed']} changed "
          f"re-encoded, {counts['removed']} removed, {counts['unreadable']} unreadable left out)")

    def answer(text: str) -> None:
        vector, kind = _query_vector(model, text)
        for path, score in index.query(vector, config["top_k"]):
            print(f"{score:.4f}  {Path(config['dir_origin_path']) / path}")

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
