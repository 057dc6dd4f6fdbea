"""Near-duplicate search as datasets/curate.py runs it: every pair of N image features compared tile by tile.

    python benchmarks/bench_curate.py [--images 20000] [--dim 512] [--threshold 0.95]

Random unit features (float32) stand in for N images, 1% of them near-copies of another (cosine about 0.98).
Prints the seconds of curate's tiled search (torch) beside FAISS's exact range search (IndexFlatIP.range_search,
where faiss is installed) and checks that both find the same groups, which hold every planted copy.
"""
from __future__ import annotations

import argparse
import sys
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threshold", type=float, default=0.95)
    args = parser.parse_args()
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
