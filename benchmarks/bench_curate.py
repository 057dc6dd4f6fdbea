"""datasets/curate.py measured: the speed of its near-duplicate search, and (with --model_path) what it finds on
the toy set with planted faults.

    python benchmarks/bench_curate.py [--images 20000] [--dim 512] [--threshold 0.95]
    python benchmarks/bench_curate.py --model_path logs/demo_en/last_epoch_weights.pth [--toy datasets/toy]

Speed: random unit features (float32) stand in for N images, 1% of them near-copies of another (cosine about
0.98). Prints the seconds of curate's tiled search (torch) beside FAISS's exact range search
(IndexFlatIP.range_search, where faiss is installed) and checks that both find the same groups, which hold every
planted copy.

Faults (through datasets/curate.py itself): on the toy val split, the captions of every tenth image are swapped
for another image's; prints how well the scores tell true from swapped captions (ROC AUC, medians) and what
min_clip_score at the 5th percentile of the true captions keeps. Then the first 1000 train images are the input
and the val split plus 0.8x copies of 25 train images the `against` set: prints each group's similarity to its
nearest train image, and how many copies and other val images are listed at --threshold.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.eval.curate import duplicate_groups, groups_of  # noqa: E402


def faiss_groups(features: torch.Tensor, threshold: float) -> list[list[int]]:
    import faiss

    x = np.ascontiguousarray(features.numpy())
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    limits, _, found = index.range_search(x, threshold)  # inner product: every result above threshold
    rows = np.repeat(np.arange(len(x)), np.diff(limits.astype(np.int64)))
    return groups_of(len(x), ((i, j) for i, j in zip(rows.tolist(), found.tolist()) if i < j))


ROOT = Path(__file__).resolve().parents[1]


def curate(model_path: str, root: Path, input: Path, output: Path, *extra: str) -> list[dict]:
    """datasets/curate.py as a user runs it; the rows of the score CSV it writes."""
    subprocess.run([sys.executable, str(ROOT / "datasets" / "curate.py"), "--model_path", model_path, "--phi", "auto",
                    "--datasets_path", str(root), "--input", str(input), "--output", str(output), *extra], check=True)
    return list(csv.DictReader(output.with_name(output.stem + "_scores.csv").read_text().splitlines()))


def roc_auc(positive: list[float], negative: list[float]) -> float:
    """The chance that a random positive scores above a random negative (ties count half)."""
    pos, neg = np.array(positive)[:, None], np.array(negative)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def faults(model_path: str, toy: Path, dup_threshold: float) -> None:
    from PIL import Image

    val = json.loads((toy / "en_val.json").read_text())
    train = json.loads((toy / "en_train.json").read_text())[:1000]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for split in ("train", "val"):
            (work / split).symlink_to((toy / split).resolve())
        swapped = {i: val[(i + len(val) // 2) % len(val)]["caption"] for i in range(0, len(val), 10)}
        (work / "swapped.json").write_text(json.dumps([{"image": e["image"], "caption": swapped.get(i, e["caption"])}
                                                       for i, e in enumerate(val)]))
        rows = curate(model_path, work, work / "swapped.json", work / "scored.json", "--min_clip_score", "-1",
                      "--duplicates", "off")
        wrong_images = {val[i]["image"] for i in swapped}
        true = [float(r["score"]) for r in rows if r["image"] not in wrong_images]
        wrong = [float(r["score"]) for r in rows if r["image"] in wrong_images]
        cut = float(np.percentile(true, 5))
        print(f"toy val, {len(true)} true and {len(wrong)} swapped captions: ROC AUC {roc_auc(true, wrong):.3f}; "
              f"median score {np.median(true):.3f} true, {np.median(wrong):.3f} swapped; min_clip_score {cut:.3f} "
              f"(5th percentile of true) keeps {np.mean(np.array(true) >= cut):.0%} of true and "
              f"{np.mean(np.array(wrong) >= cut):.0%} of swapped captions")

        (work / "copies").mkdir()
        copied = {}
        for k, entry in enumerate(train[::40][:25]):
            with Image.open(work / entry["image"]) as image:
                name = f"copies/{k:03d}.jpg"
                image.resize((round(image.width * 0.8), round(image.height * 0.8)), Image.BICUBIC).save(work / name)
                copied[name] = entry["image"]
        (work / "train.json").write_text(json.dumps(train))
        (work / "against.json").write_text(json.dumps(val + [{"image": n, "caption": ["x"]} for n in copied]))
        # dup_threshold -1 lists every against image with its nearest input image: the whole distribution.
        curate(model_path, work, work / "train.json", work / "kept.json", "--min_clip_score", "-1",
               "--duplicates", "off", "--dup_threshold", "-1", "--against", str(work / "against.json"))
        nearest = list(csv.DictReader((work / "kept_leakage.csv").read_text().splitlines()))
        copies = [float(r["similarity"]) for r in nearest if r["against_image"] in copied]
        others = [float(r["similarity"]) for r in nearest if r["against_image"] not in copied]
        matched = sum(copied.get(r["against_image"]) == r["input_image"] for r in nearest)
        print(f"leakage, {len(train)} train images vs {len(val)} val images + {len(copied)} 0.8x copies of train "
              f"images: {matched} copies have their original as nearest train image; similarity to the nearest, "
              f"copies {min(copies):.4f} min / {np.median(copies):.4f} median, val images {np.median(others):.4f} "
              f"median / {max(others):.4f} max; at dup_threshold {dup_threshold:g}: "
              f"{sum(c > dup_threshold for c in copies)} copies found, "
              f"{sum(o > dup_threshold for o in others)} val images listed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--model_path", default="", help="trained weights: measure the planted faults instead")
    parser.add_argument("--toy", type=Path, default=ROOT / "datasets" / "toy")
    args = parser.parse_args()
    if args.model_path:
        faults(args.model_path, args.toy, args.threshold)
        return
    g = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(args.images, args.dim, generator=g), dim=1)
    copies = torch.randperm(args.images, generator=g)[: args.images // 50].view(-1, 2)  # (copy, original)
    noise = 0.2 / args.dim ** 0.5 * torch.randn(len(copies), args.dim, generator=g)
    features[copies[:, 0]] = F.normalize(features[copies[:, 1]] + noise, dim=1)
    planted = sorted(sorted(pair) for pair in copies.tolist())

    started = time.perf_counter()
    ours = duplicate_groups(features, args.threshold)
    seconds = time.perf_counter() - started
    assert all(pair in ours for pair in planted), "a planted copy was missed"
    print(f"{args.images} images x {args.dim} dims, threshold {args.threshold:g}, {torch.get_num_threads()} threads: "
          f"{len(ours)} groups ({len(planted)} planted)")
    print(f"curate (torch, tiles of 4096): {seconds:.2f} s")
    try:
        started = time.perf_counter()
        theirs = faiss_groups(features, args.threshold)
        print(f"faiss IndexFlatIP.range_search: {time.perf_counter() - started:.2f} s; same groups: {theirs == ours}")
    except ImportError:
        print("faiss: not installed")


if __name__ == "__main__":
    main()
