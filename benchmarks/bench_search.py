"""Exact search speed: one query against N indexed images, as predict.py mode="search" runs it.

    python benchmarks/bench_search.py [--images 100000] [--dim 512] [--k 10] [--reps 20]

Random unit features (float32) stand in for an index of N images; prints the median query time of the chunked
matrix product + top-k, the index's memory, and checks the result against a single full matrix product.
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

from utils.predict.search import top_k  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(args.images, args.dim, generator=g), dim=1)
    queries = F.normalize(torch.randn(args.reps + 1, args.dim, generator=g), dim=1)
    times = []
    for query in queries:
        started = time.perf_counter()
        scores, rows = top_k(features, query, args.k)
        times.append(time.perf_counter() - started)
        assert rows == (features @ query).topk(args.k).indices.tolist()
    print(f"{args.images} images x {args.dim} dims ({features.numel() * 4 / 2**20:.0f} MiB float32), top {args.k}, "
          f"{torch.get_num_threads()} threads: median {1000 * float(np.median(times[1:])):.1f} ms per query "
          f"(max {1000 * max(times[1:]):.1f} ms), same rows as one full matrix product")


if __name__ == "__main__":
    main()
