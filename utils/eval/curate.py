"""What datasets/curate.py does: score image-caption pairs, find near-duplicates and leaks, write the kept set."""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Sequence

import torch

from clip import CLIP
from utils.data.preflight import preflight
from utils.data.sources.shards import is_shard_source
from utils.device import loader_workers
from utils.errors import UserError
from utils.eval.encode import caption_index, encode_captions, encode_images
from utils.files import atomic_savefig, atomic_write_bytes, check_writable, refuse_existing

DUPLICATE_MODES = ("drop", "list", "off")
CAPTION_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv")
# Similarities are computed tile by tile, TILE x TILE at a time (64 MiB of float32), so finding duplicates among
# N images never holds an N x N matrix.
TILE = 4096


def report_paths(output: str | Path) -> dict[str, Path]:
    """Every file a run may write: the kept captions and the reports named after them."""
    output = Path(output)
    stem = output.with_suffix("")
    return {"kept": output, "scores": Path(f"{stem}_scores.csv"), "histogram": Path(f"{stem}_scores.png"),
            "duplicates": Path(f"{stem}_duplicates.json"), "leakage": Path(f"{stem}_leakage.csv")}


def pair_scores(entries: Sequence[dict], image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """The cosine similarity of each caption (caption_index order) with its own image; features are unit vectors."""
    _, txt2img, _ = caption_index(entries)
    images = image_features.float().cpu()[torch.tensor(txt2img, dtype=torch.long)]
    return (images * text_features.float().cpu()).sum(dim=-1)


def near_duplicate_pairs(features: torch.Tensor, threshold: float, tile: int = TILE):
    """(i, j) with i < j for every two rows of `features` (unit vectors) whose cosine similarity is above
    `threshold`, found tile by tile."""
    n = len(features)
    for r0 in range(0, n, tile):
        rows = features[r0:r0 + tile]
        for c0 in range(r0, n, tile):
            hits = (rows @ features[c0:c0 + tile].T > threshold).nonzero()
            i, j = hits[:, 0] + r0, hits[:, 1] + c0
            yield from zip(i[i < j].tolist(), j[i < j].tolist())


def groups_of(n: int, pairs) -> list[list[int]]:
    """The connected parts with two or more of `n` items joined by `pairs` (i, j): ascending indices, groups
    ordered by their first."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)  # the root is the group's first item
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return [members for _, members in sorted(groups.items()) if len(members) > 1]


def duplicate_groups(features: torch.Tensor, threshold: float, tile: int = TILE,
                     pairs_per_image: int = 100) -> list[list[int]]:
    """Groups of images joined by chains of near-duplicate pairs (cosine similarity above `threshold`).

    Stops with a UserError past `pairs_per_image` pairs per image on average: a model that cannot tell the images
    apart at this threshold (random weights, or a threshold far too low) would otherwise join N^2 / 2 pairs, one
    by one."""
    limit = pairs_per_image * len(features)

    def counted():
        for count, pair in enumerate(near_duplicate_pairs(features, threshold, tile), start=1):
            if count > limit:
                raise UserError(f"dup_threshold {threshold:g} makes over {limit} pairs of the {len(features)} images "
                                "near-duplicates: at this threshold the model does not tell them apart. Raise "
                                "dup_threshold (or check model_path), or set duplicates off")
            yield pair

    return groups_of(len(features), counted())


def nearest(queries: torch.Tensor, keys: torch.Tensor, tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarity, index) of each query's most similar key (unit vectors), found tile by tile."""
    best = torch.full((len(queries),), -2.0, device=queries.device)
    index = torch.zeros(len(queries), dtype=torch.long, device=queries.device)
    for r0 in range(0, len(queries), tile):
        rows = queries[r0:r0 + tile]
        for c0 in range(0, len(keys), tile):
            value, at = (rows @ keys[c0:c0 + tile].T).max(dim=1)
            better = value > best[r0:r0 + tile]
            best[r0:r0 + tile] = torch.where(better, value, best[r0:r0 + tile])
            index[r0:r0 + tile] = torch.where(better, at + c0, index[r0:r0 + tile])
    return best, index


def curate(entries: Sequence[dict], scores: torch.Tensor, min_clip_score: float,
           groups: Sequence[Sequence[int]], drop_duplicates: bool) -> tuple[dict[int, dict], list[str]]:
    """({entry index: kept entry}, why each caption was dropped: "" for kept). A caption stays when its score is
    at least `min_clip_score`; an image with none left goes; of each group, only the first image in file order
    that still has a caption stays when `drop_duplicates`."""
    _, _, img2txt = caption_index(entries)
    passing = (scores >= min_clip_score).tolist()
    why = ["" if ok else "score" for ok in passing]
    duplicate_of: dict[int, int] = {}
    if drop_duplicates:
        for group in groups:
            alive = [i for i in group if any(passing[t] for t in img2txt[i])]
            duplicate_of.update((i, alive[0]) for i in alive[1:])
    kept = {}
    for i, entry in enumerate(entries):
        if i in duplicate_of:
            for t in img2txt[i]:
                why[t] = why[t] or f"duplicate of {entries[duplicate_of[i]]['image']}"
            continue
        captions = [entry["caption"][k] for k, t in enumerate(img2txt[i]) if passing[t]]
        if captions:
            kept[i] = {"image": entry["image"], "caption": captions}
    return kept, why


def caption_file_bytes(entries: Sequence[dict], path: Path, columns: tuple[str, str]) -> bytes:
    """`entries` as a caption file the project reads, in the format its suffix names."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return json.dumps(list(entries), ensure_ascii=False, indent=1).encode("utf-8")
    if suffix == ".jsonl":
        return "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode("utf-8")
    return _csv_bytes([columns, *((e["image"], c) for e in entries for c in e["caption"])],
                      "\t" if suffix == ".tsv" else ",")


def _csv_bytes(rows, delimiter: str = ",") -> bytes:
    text = io.StringIO()
    csv.writer(text, delimiter=delimiter, lineterminator="\n").writerows(rows)
    return text.getvalue().encode("utf-8")


def plot_scores(scores: torch.Tensor, min_clip_score: float, passing: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(scores.numpy(), bins=60, color="tab:blue")
    if min_clip_score > -1:
        ax.axvline(min_clip_score, color="tab:red", linestyle="--", label=f"min_clip_score {min_clip_score:g}")
        ax.legend()
    ax.set_xlabel("cosine similarity of image and caption")
    ax.set_ylabel("captions")
    ax.set_title(f"{title}: {passing} of {len(scores)} captions at least {min_clip_score:g}")
    fig.tight_layout()
    atomic_savefig(fig, path)


def check_settings(cfg: dict) -> dict[str, Path]:
    """The files the run will write, after every setting and output is checked: nothing is read or loaded before
    a mistake here is reported, and no file a user has is replaced without overwrite."""
    for name in ("min_clip_score", "dup_threshold"):
        value = cfg[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1:
            raise UserError(f"--{name} must be a cosine similarity, from -1 to 1, got {value!r}")
    if cfg["duplicates"] not in DUPLICATE_MODES:
        raise UserError(f"--duplicates must be one of {', '.join(DUPLICATE_MODES)}, got {cfg['duplicates']!r}")
    for name in ("input", "against"):
        if cfg[name] and is_shard_source(cfg[name]):
            raise UserError(f"{name} {cfg[name]} names WebDataset shards; curate reads caption files: write them as "
                            "one with datasets/convert.py --source wds first")
        if (cfg[name] or name == "input") and not Path(cfg[name]).is_file():
            raise UserError(f"{name} {cfg[name]!r} is not a file; point --{name} at a caption file (.json, .jsonl, "
                            ".csv or .tsv)")
    output = Path(cfg["output"])
    if output.suffix.lower() not in CAPTION_SUFFIXES:
        raise UserError(f"output {output} must end in {', '.join(CAPTION_SUFFIXES)} (the caption format to write)")
    paths = report_paths(output)
    if cfg["duplicates"] == "off":
        del paths["duplicates"]
    if not cfg["against"]:
        del paths["leakage"]
    for name in ("input", "against"):
        if cfg[name] and Path(cfg[name]).resolve() in {p.resolve() for p in paths.values()}:
            raise UserError(f"{name} {cfg[name]} is also an output of this run; choose another output")
    refuse_existing(paths.values(), cfg["overwrite"], "another output")
    check_writable(output.parent, "output")
    return paths


def run_curate(cfg: dict) -> dict:
    """Score, deduplicate and check `input` (against `against`), write the kept set and the reports; returns
    the counts printed."""
    cfg = {**cfg, "num_workers": loader_workers(cfg["num_workers"])}
    paths = check_settings(cfg)
    columns = (cfg["csv_image_column"], cfg["csv_caption_column"])
    root = Path(cfg["datasets_path"])
    entries = preflight(cfg["input"], root, cfg["num_workers"], cfg["skip_bad_samples"], columns=columns)
    against_root = Path(cfg["against_datasets_path"] or root)
    against = preflight(cfg["against"], against_root, cfg["num_workers"], cfg["skip_bad_samples"],
                        columns=columns) if cfg["against"] else []
    started = time.time()
    clip = CLIP.from_config(cfg)

    def images_of(items: Sequence[dict], folder: Path) -> torch.Tensor:
        return encode_images(clip.pipeline, items, folder, cfg["batch_size"], cfg["num_workers"])

    image_features = images_of(entries, root)
    captions, txt2img, _ = caption_index(entries)
    text_features = encode_captions(clip.net, captions, clip.tokenizer, cfg["batch_size"], clip.device)
    scores = pair_scores(entries, image_features, text_features)
    groups = [] if cfg["duplicates"] == "off" else duplicate_groups(image_features, cfg["dup_threshold"])
    kept, why = curate(entries, scores, cfg["min_clip_score"], groups, cfg["duplicates"] == "drop")
    passing = int((scores >= cfg["min_clip_score"]).sum())
    summary = {"images": len(entries), "captions": len(captions), "passing_captions": passing,
               "kept_images": len(kept), "kept_captions": sum(len(e["caption"]) for e in kept.values())}
    if against:
        similarity, index = nearest(images_of(against, against_root), image_features)
        leaks = [(e["image"], entries[j]["image"], s)
                 for e, j, s in zip(against, index.tolist(), similarity.tolist()) if s > cfg["dup_threshold"]]
        summary["against_images"], summary["leaked_images"] = len(against), len(leaks)

    atomic_write_bytes(caption_file_bytes(list(kept.values()), paths["kept"], columns), paths["kept"])
    atomic_write_bytes(_csv_bytes([("image", "caption", "score", "kept", "dropped_because"),
                                   *((entries[i]["image"], caption, f"{score:.6f}", str(not reason).lower(), reason)
                                     for caption, i, score, reason in zip(captions, txt2img, scores.tolist(), why))]),
                       paths["scores"])
    plot_scores(scores, cfg["min_clip_score"], passing, paths["histogram"], Path(cfg["input"]).name)
    print(f"{cfg['input']}: {len(captions)} captions of {len(entries)} images; {passing} score at least "
          f"min_clip_score {cfg['min_clip_score']:g} (scores from {scores.min():.3f} to {scores.max():.3f}, "
          f"median {scores.median():.3f})")
    if cfg["duplicates"] != "off":
        summary["duplicate_groups"] = len(groups)
        summary["duplicate_images"] = sum(len(g) - 1 for g in groups)
        listing = [[{"image": entries[i]["image"], "kept": i in kept,
                     "similarity": round(float(image_features[i] @ image_features[g[0]]), 6)} for i in g]
                   for g in groups]
        atomic_write_bytes(json.dumps(listing, ensure_ascii=False, indent=1).encode("utf-8"), paths["duplicates"])
        print(f"near-duplicates (cosine above {cfg['dup_threshold']:g}): {len(groups)} groups, "
              f"{summary['duplicate_images']} images beyond the first of their group"
              f"{' (dropped)' if cfg['duplicates'] == 'drop' else ' (kept: duplicates=list)'}")
    if against:
        atomic_write_bytes(_csv_bytes([("against_image", "input_image", "similarity"),
                                       *((a, b, f"{s:.6f}") for a, b, s in leaks)]), paths["leakage"])
        print(f"leakage: {len(leaks)} of {len(against)} images of {cfg['against']} have a near-duplicate in "
              f"{cfg['input']} (cosine above {cfg['dup_threshold']:g})")
    print(f"kept {summary['kept_captions']} captions of {len(kept)} images in {paths['kept']}")
    print(f"{time.time() - started:.1f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return summary
