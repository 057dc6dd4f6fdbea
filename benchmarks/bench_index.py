"""The FAISS index of predict.py mode="index" at scale: build time, memory, query time and recall@10 against exact.

    python benchmarks/bench_index.py [--vectors 1000000] [--dim 512] [--types auto Flat] [--index_memory 4G]
                                     [--queries 1000] [--clusters 1000] [--threads 2] [--keep DIR]

Unit vectors drawn from a mixture of `--clusters` Gaussian clusters (each vector: its cluster's unit centre
plus isotropic noise of norm `--noise`, renormalised: cosine with the centre about 0.7 at 1, 0.5 at 1.7; CLIP
image features cluster by content, though less cleanly than either) are written as an embeddings folder in float16, as mode="embed" writes it, part by
part (nothing holds all vectors in memory, so 10M runs where the index fits). Each index type is then built by
utils/predict/index.build exactly as mode="index" builds it (its search setting tuned on held-out rows to
recall@10 >= 0.95), and timed on those held-out rows at batch 1 and batch 64. The `Flat` row is exact search
(FAISS), and the last column compares with today's exact folder search (utils/predict/search.top_k, a torch
matrix product over float32 features) where those fit in memory. `uptime`'s load is printed with the results:
on a shared machine every time is an upper bound.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PART = 100_000


def write_vectors(folder: Path, n: int, dim: int, clusters: int, noise: float = 1.0, seed: int = 0) -> None:
    """n mixture-of-clusters unit vectors as an embeddings folder of float16 parts (metadata: the row number)."""
    from utils.predict.index import write_part

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    width = len(str((n + PART - 1) // PART))
    for part, start in enumerate(range(0, n, PART)):
        count = min(PART, n - start)
        part_rng = np.random.default_rng([seed, part])
        x = centres[part_rng.integers(clusters, size=count)]
        x = x + noise * part_rng.standard_normal((count, dim)).astype(np.float32) / np.sqrt(dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        write_part(folder, str(part).zfill(width), x.astype(np.float16), None,
                   {"image_path": [str(i) for i in range(start, start + count)]})


def load() -> str:
    return os.getloadavg().__repr__() if hasattr(os, "getloadavg") else "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--types", nargs="+", default=["auto", "Flat"])
    parser.add_argument("--index_memory", default="4G")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=1.0, help="noise norm / centre norm: 1 gives cosine ~0.7 "
                        "with the centre, 1.7 about 0.5")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", default="", help="an embeddings folder to reuse (written there when missing)")
    args = parser.parse_args()

    import faiss
    import torch

    from utils.files import human_size
    from utils.predict.index import Embeddings, build, choose_key, ms_per_query, parse_memory
    from utils.predict.search import top_k

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_index_"))
    try:
        if not (folder / "img_emb").is_dir():
            started = time.perf_counter()
            write_vectors(folder, args.vectors, args.dim, args.clusters, args.noise)
            print(f"wrote {args.vectors:,} x {args.dim} float16 vectors ({args.clusters} clusters, noise {args.noise}) to {folder} in "
                  f"{time.perf_counter() - started:.0f} s")
        emb = Embeddings.open(folder)
        memory = parse_memory(args.index_memory)
        print(f"{emb.total:,} vectors, {args.threads} threads, index_memory {args.index_memory}; load before: {load()}")
        print("| type | key | build s | memory | search setting | recall@10 | ms/query batch 1 | ms/query batch 64 |")
        print("|---|---|---|---|---|---|---|---|")
        exact_ms = None
        for kind in args.types:
            key = choose_key(emb.total, emb.dim, memory, kind)
            index, report = build(emb, key, queries=args.queries, progress=lambda line: print(line, file=sys.stderr, flush=True))
            rng = np.random.default_rng(1)
            held = np.sort(rng.choice(emb.total, size=min(args.queries, emb.total), replace=False))
            queries = emb.rows_at(held)
            batch1 = ms_per_query(index, queries[:200], 1)
            batch64 = ms_per_query(index, queries, 64)
            setting = ", ".join(f"{k}={v}" for k, v in report["params"].items()) or "exact"
            print(f"| {kind} | {key} | {report['build_seconds']:.1f} | {human_size(report['memory_bytes'])} | "
                  f"{setting} | {report['recall_at_10']:.3f} | {batch1:.2f} | {batch64:.2f} |", flush=True)
            del index
        if emb.total * emb.dim * 4 <= 4 * 2**30:
            features = torch.from_numpy(emb.rows_at(np.arange(emb.total)))
            times = []
            for query in torch.from_numpy(emb.rows_at(np.arange(0, emb.total, max(1, emb.total // 21))[:21])):
                started = time.perf_counter()
                top_k(features, query, 10)
                times.append(time.perf_counter() - started)
            exact_ms = 1000 * float(np.median(times[1:]))
            print(f"today's exact folder search (torch, float32, {human_size(features.numel() * 4)}): "
                  f"{exact_ms:.1f} ms per query at batch 1")
        print(f"load after: {load()}")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
