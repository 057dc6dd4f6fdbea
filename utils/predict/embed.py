"""mode="embed": image (and caption) features of a folder, a caption file or shards, in clip-retrieval's layout.

The output folder is what clip-retrieval's inference writes and autofaiss / clip-retrieval's back end read:
`img_emb/img_emb_{part}.npy` (unit rows), `text_emb/text_emb_{part}.npy` (where there are captions, row i the
caption of metadata row i) and `metadata/metadata_{part}.parquet` (`image_path`, `caption`, `shard` for shards).
A row is one (image, caption) pair, so an image with five captions has five rows holding its one vector: the
three files of a part stay row-aligned, as those readers expect. `embed.json` beside them records the model and
the input, so that a rerun continues only the same job.

The input is cut into parts fixed by the input alone (`part_size` images, or one shard each); process r of N
takes parts r, r+N, ...; a part is written file by file, atomically, its metadata last, and a part whose metadata
exists is done. A kill at any moment therefore loses at most the parts in flight, and a rerun writes exactly those.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import UserError
from utils.files import atomic_write_bytes, check_writable
from utils.predict.embeddings import part_done, part_notes, part_paths, write_part

MANIFEST = "embed.json"
DTYPES = {"float16": np.float16, "float32": np.float32}
SHOWN = 20


@dataclass(frozen=True)
class Item:
    """One image to embed: the path its metadata shows (a file's path, or a shard sample's key), its captions (none
    in a folder), and for shard samples the image's bytes and the shard."""
    image_path: str
    captions: tuple[str, ...] = ()
    data: bytes | None = field(default=None, compare=False, repr=False)
    shard: str | None = None


@dataclass
class Plan:
    """The input cut into parts: `parts[p]()` lists part p's items; `identity` changes whenever the input does."""
    kind: str
    parts: list[Callable[[], list[Item]]]
    sizes: list[int | None]
    identity: str
    text: bool
    root: str

    def name(self, part: int) -> str:
        """clip-retrieval's part names: zero-padded to the width of the part count, so name order is part order."""
        return str(part).zfill(len(str(len(self.parts))))


def _digest(values) -> str:
    return hashlib.sha256(json.dumps(values, ensure_ascii=False).encode("utf-8")).hexdigest()[:32]


def _chunks(items: list[Item], size: int) -> list[Callable[[], list[Item]]]:
    return [lambda start=start: items[start:start + size] for start in range(0, len(items), size)]


def _sizes(items: list[Item], size: int) -> list[int]:
    return [min(size, len(items) - start) for start in range(0, len(items), size)]


def folder_plan(folder: str | Path, part_size: int) -> Plan:
    from utils.predict.folder import images_under

    folder = Path(folder)
    items = [Item(str(path)) for path in images_under(folder)]
    return Plan("folder", _chunks(items, part_size), _sizes(items, part_size),
                _digest(["folder", part_size, [i.image_path for i in items]]), False, str(folder))


def caption_items(caption_file: str | Path, datasets_path: str | Path = "",
                  columns: tuple[str, str] = ("filepath", "title")) -> tuple[list[Item], Path]:
    """The entries of a caption file train.py reads (JSON list, JSON Lines, CSV, TSV) as items, image paths
    joined to `datasets_path` (default: the caption file's folder). Malformed entries are refused together."""
    from utils.dataloader import entry_problem, normalise
    from utils.data.preflight import read_annotations

    caption_file = Path(caption_file)
    if not caption_file.is_file():
        raise UserError(f"caption_file {caption_file} does not exist")
    root = Path(datasets_path) if datasets_path else caption_file.parent
    if not root.is_dir():
        raise UserError(f"datasets_path {root} is not a folder; point it at the folder the caption file's image "
                        "paths are relative to")
    entries = read_annotations(caption_file, columns=columns)
    problems = [(i, why) for i, entry in enumerate(entries) if (why := entry_problem(entry))]
    if problems:
        listing = "\n".join(f"  entry {i}: {why}" for i, why in problems[:SHOWN])
        raise UserError(f"{caption_file}: {len(problems)} of {len(entries)} entries are malformed; fix them:\n{listing}")
    items = [Item(str(root / e["image"]), tuple(e["caption"])) for e in map(normalise, entries)]
    if not items:
        raise UserError(f"{caption_file} holds no entries")
    return items, root


def caption_plan(caption_file: str | Path, datasets_path: str | Path, part_size: int) -> Plan:
    items, root = caption_items(caption_file, datasets_path)
    return Plan("captions", _chunks(items, part_size), _sizes(items, part_size),
                _digest(["captions", part_size, [(i.image_path, i.captions) for i in items]]), True, str(root))


def _shard_items(shard: Path, limit: int | None = None) -> list[Item]:
    from itertools import islice

    from utils.data.sources.shards import IMAGE_EXTENSIONS, sample_captions, samples

    items = []
    for key, files in islice(samples(shard), limit):
        extension = next((e for e in IMAGE_EXTENSIONS if e in files), None)
        data = files.get(extension, b"")
        try:
            captions = tuple(sample_captions(files))
        except (UnicodeDecodeError, json.JSONDecodeError):
            captions = ()

        items.append(Item(key, captions, data, str(shard)))
    return items


def shard_plan(pattern: str) -> Plan:
    """One part per shard, in the shards' order; captions are embedded when the first sample has any."""
    from utils.data.sources.shards import shard_paths

    shards = shard_paths(pattern)
    stats = [(str(s), s.stat().st_size, s.stat().st_mtime_ns) for s in shards]
    first = _shard_items(shards[0], limit=1)
    return Plan("shards", [lambda s=s: _shard_items(s) for s in shards], [None] * len(shards),
                _digest(["shards", stats]), bool(first and first[0].captions), str(shards[0].parent))


def plan_input(config: dict) -> Plan:
    source = config["caption_file"]
    if not source:
        return folder_plan(config["dir_origin_path"], config["part_size"])
    from utils.data.sources.shards import is_shard_source

    if is_shard_source(source) or Path(source).is_dir():
        return shard_plan(source)
    return caption_plan(source, config["datasets_path"], config["part_size"])


@torch.no_grad()
def item_features(model, items: Sequence[Item], batch_size: int = 32, num_workers: int | None = 0,
                  problems: list[str] | None = None, text: bool = True, progress: Callable[[int], None] | None = None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, list[dict]]]:
    """Per batch of images: (image features, caption features or None, metadata rows), one row per (image,
    caption) pair (one per image without captions), features unit float32 on the CPU, as CLIP.detect_image_for_eval
    computes them; images through model.pipeline, `num_workers` threads decoding ahead. Unreadable images (and,
    with `text`, images without a caption) go to `problems`, not to rows. `progress(n)` is told of each batch's n
    images, read or not."""
    problems = [] if problems is None else problems
    where = lambda item: f"{item.shard}: {item.image_path}" if item.shard else item.image_path  # noqa: E731
    if text:  # an image without a caption has no row: not worth decoding
        problems += [f"{where(item)}: no caption" for item in items if not item.captions]
        captioned = [item for item in items if item.captions]
        if progress is not None and len(captioned) < len(items):
            progress(len(items) - len(captioned))
        items = captioned
    encoding = model.pipeline.encode([item.data if item.data is not None else item.image_path for item in items],
                                     batch_size, num_workers, [where(item) for item in items], progress)
    reported = 0
    for positions, image_features in encoding:
        problems += [f"{name}: {why}" for name, why in encoding.unreadable[reported:]]
        reported = len(encoding.unreadable)
        owner, rows = [], []
        for position, index in enumerate(positions):
            item = items[index]
            for caption in (item.captions if text else (None,)):
                owner.append(position)
                row = {"image_path": item.image_path}
                if text:
                    row["caption"] = caption
                if item.shard is not None:
                    row["shard"] = item.shard
                rows.append(row)
        texts = None
        if text:
            tokens = model.tokenize([row["caption"] for row in rows]).to(model.device)
            texts = torch.cat([F.normalize(model.net.encode_text(tokens[s:s + batch_size]).float(), dim=-1).cpu()
                               for s in range(0, len(tokens), batch_size)])
        yield image_features.cpu()[torch.tensor(owner)], texts, rows
    problems += [f"{name}: {why}" for name, why in encoding.unreadable[reported:]]


def embed_part(model, plan: Plan, part: int, out: Path, dtype, batch_size: int, num_workers: int, bar=None) -> int:
    """Embed and write part `part`; returns its row count."""
    items = plan.parts[part]()
    problems: list[str] = []
    images, texts, rows = [], [], []
    for image_rows, text_rows, meta in item_features(model, items, batch_size, num_workers, problems, plan.text,
                                                     bar.update if bar is not None else None):
        images.append(image_rows)
        texts.append(text_rows)
        rows += meta
    dim = model.net.config.embed_dim
    stack = lambda parts: (torch.cat(parts) if parts else torch.zeros(0, dim)).numpy().astype(dtype)  # noqa: E731
    columns = {key: [row[key] for row in rows] for key in (["image_path"] + (["caption"] if plan.text else [])
                                                           + (["shard"] if plan.kind == "shards" else []))}
    write_part(out, plan.name(part), stack(images), stack(texts) if plan.text else None, columns,
               {"unreadable": problems, "images": len(items)})
    return len(rows)


def check_manifest(out: Path, manifest: dict) -> bool:
    """Whether `out` already holds (part of) this very job; refuses a folder holding another job's parts."""
    path = out / MANIFEST
    if not path.is_file():
        if any((out / sub).is_dir() and any((out / sub).iterdir()) for sub in ("img_emb", "metadata")):
            raise UserError(f"embeddings_dir {out} already holds embeddings that this project did not record "
                            f"(no {MANIFEST}); choose an empty or new embeddings_dir")
        return False
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}); choose a new embeddings_dir") from e
    differs = [k for k in ("model", "input", "dtype", "text") if found.get(k) != manifest[k]]
    if differs:
        raise UserError(f"embeddings_dir {out} holds the embeddings of another job (its {', '.join(differs)} "
                        "differ from this run's); choose a new embeddings_dir, or delete that one to start over")
    return True


def summary(out: Path, plan: Plan) -> tuple[int, list[str]]:
    """(rows, unreadable images) over every part written, this run's and earlier ones'."""
    import pyarrow.parquet as pq

    rows, problems = 0, []
    for part in range(len(plan.parts)):
        path = part_paths(out, plan.name(part))["metadata"]
        rows += pq.read_metadata(path).num_rows
        problems += part_notes(path).get("unreadable", [])
    return rows, problems


def run_embed(config: dict) -> dict:
    """predict.py mode="embed" (one process, or this process's share under torchrun --distributed true)."""
    from tqdm import tqdm

    from clip import CLIP

    from utils.device import resolve_device
    from utils.eval.feature_cache import model_identity
    from utils.train.distributed import cleanup, init_distributed

    out = Path(config["embeddings_dir"])
    plan = plan_input(config)
    device = resolve_device(config["Cuda"])
    info = init_distributed(config["distributed"], device.type == "cuda")
    try:
        model = CLIP.from_config(config)
        # model_path: where mode "index" finds these weights again to encode its text queries.
        manifest = {"model": model_identity(model.weights_path or "", model.phi), "phi": model.phi,
                    "model_path": str(Path(model.weights_path).resolve()) if model.weights_path else "",
                    "input": {"kind": plan.kind, "identity": plan.identity}, "parts": len(plan.parts),
                    "dtype": config["embed_dtype"], "text": plan.text, "root": str(Path(plan.root).resolve()),
                    "letterbox_image": config["letterbox_image"], "fast_decode": config["fast_decode"]}
        # Every rank checks: all refuse together, and none waits at a barrier for one that gave up.
        check_writable(out, "embeddings_dir")
        resumed = check_manifest(out, manifest)
        if info.is_main:
            if not resumed:
                atomic_write_bytes(json.dumps(manifest, indent=1).encode("utf-8"), out / MANIFEST)
            done = sum(part_done(out, plan.name(p), plan.text) for p in range(len(plan.parts)))
            print(f"embedding {plan.kind} into {out}: {len(plan.parts)} parts over {info.world_size} process(es)"
                  + (f"; {done} done by an earlier run, skipped" if done else ""))
        if info.enabled:
            torch.distributed.barrier()
        todo = [p for p in range(info.rank, len(plan.parts), info.world_size)
                if not part_done(out, plan.name(p), plan.text)]
        sizes = [plan.sizes[p] for p in todo]
        total = sum(sizes) if None not in sizes else None
        bar = tqdm(total=total, unit="img", desc="embed", disable=not info.is_main, smoothing=0.1)
        dtype = DTYPES[config["embed_dtype"]]
        for part in todo:
            embed_part(model, plan, part, out, dtype, config["batch_size"], config["num_workers"], bar)
        bar.close()
        if info.enabled:
            torch.distributed.barrier()
        rows, problems = summary(out, plan) if info.is_main else (0, [])
        if info.is_main:
            for problem in problems[:SHOWN]:
                print(f"skipped {problem}")
            more = f" (first {SHOWN} listed)" if len(problems) > SHOWN else ""
            print(f"{rows} rows in {len(plan.parts)} parts, {len(problems)} images skipped{more}; wrote {out} "
                  f"(img_emb/{', text_emb/' if plan.text else ''}, metadata/)")
        return {"rows": rows, "unreadable": problems, "parts": len(plan.parts)}
    finally:
        cleanup(info)
