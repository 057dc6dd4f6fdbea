"""Exact search speed: one query against N indexed images, as predict.py mode="search" answers it.

    python benchmarks/bench_search.py [--images 100000] [--dim 512] [--k 10] [--reps 20]

Random unit features (float32) are written as a folder search's index (one part, utils/predict/embeddings.write_part)
and opened as mode="search" opens it (utils/predict/index.VectorIndex: verified, then a FAISS Flat index); prints
the time to open it, the median query time, the index's memory, and checks each answer against one full matrix
product.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()

    import faiss

    from utils.predict.embeddings import write_part
    from utils.predict.index import FORMAT, VectorIndex, write_manifest

    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    features = unit(rng.standard_normal((args.images, args.dim), dtype=np.float32))
    queries = unit(rng.standard_normal((args.reps + 1, args.dim), dtype=np.float32))
    with tempfile.TemporaryDirectory() as folder:
        write_part(folder, "00000", features, None, {"image_path": [str(i) for i in range(args.images)]})
        write_manifest(Path(folder), {"format": FORMAT, "embeddings_dir": ".", "key": "Flat", "dim": args.dim,
                                      "parts": {"00000": args.images}, "removed": {}, "params": {}})
        started = time.perf_counter()
        index = VectorIndex(folder)
        opened = time.perf_counter() - started
        times = []
        for query in queries:
            started = time.perf_counter()
            found = index.search(query, args.k)[0]
            times.append(time.perf_counter() - started)
            assert [row for row, _ in found] == np.argsort(-(features @ query), kind="stable")[:args.k].tolist()
    print(f"{args.images} images x {args.dim} dims ({features.nbytes / 2**20:.0f} MiB float32), top {args.k}, "
          f"{faiss.omp_get_max_threads()} threads: opened in {opened:.2f} s, median {1000 * float(np.median(times[1:])):.1f} "
          f"ms per query (max {1000 * max(times[1:]):.1f} ms), same rows as one full matrix product")


if __name__ == "__main__":
    main()
