"""Time retrieval_metrics at Flickr30k scale, and itm_eval against the original's per-query loop.

    python benchmarks/bench_metrics.py [--chunk-size 1024] [--device cpu] [--images 31014] [--threads 1]

Peak memory comes from ru_maxrss, a high-water mark for the whole process, so the large run goes first
and each configuration needs a fresh process. Features are generated in place, block by block, so that
their generation does not leave a higher mark than the measured call.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from utils.metrics import itm_eval, retrieval_metrics  # noqa: E402

GIB = 2**30


def _current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    # Linux reports kilobytes, macOS bytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _unit_rows(n: int, dim: int, generator: torch.Generator, block: int = 8192) -> torch.Tensor:
    features = torch.empty(n, dim)
    for start in range(0, n, block):
        rows = features[start:start + block]
        rows.normal_(generator=generator)
        rows /= rows.norm(dim=1, keepdim=True)
    return features


def bench_flickr(n_images: int, captions_per_image: int, dim: int, chunk_size: int | None, device: str) -> None:
    generator = torch.Generator().manual_seed(0)
    images = _unit_rows(n_images, dim, generator).to(device)
    texts = _unit_rows(n_images * captions_per_image, dim, generator).to(device)
    txt2img = np.arange(len(texts)) // captions_per_image
    img2txt = [list(range(i * captions_per_image, (i + 1) * captions_per_image)) for i in range(n_images)]

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before, peak_before = _current_rss(), _peak_rss()
    load_before = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    chunking = {} if chunk_size is None else {"chunk_size": chunk_size}
    result = retrieval_metrics(images, texts, txt2img, img2txt, device=device, **chunking)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak_after = _peak_rss()

    # Other processes on a small machine slow torch's threads down badly, so say how busy it was.
    print(f"retrieval_metrics {n_images} images x {len(texts)} captions x {dim}, chunk_size={chunk_size or 'default'}, "
          f"{device}, {torch.get_num_threads()} threads: {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU "
          f"(load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)")
    if peak_after > peak_before:
        print(f"  peak extra host memory: {(peak_after - rss_before) / GIB:.2f} GiB "
              f"(features {(images.nbytes + texts.nbytes) / GIB:.2f} GiB not counted)")
    else:
        print(f"  peak extra host memory: at most {(peak_before - rss_before) / GIB:.2f} GiB "
              "(hidden under an earlier peak)")
    if device.startswith("cuda"):
        extra = torch.cuda.max_memory_allocated() - images.nbytes - texts.nbytes
        print(f"  peak extra GPU memory: {extra / GIB:.2f} GiB")
    print("  " + ", ".join(f"{key}={value:.3f}" for key, value in result.items()))


def _itm_eval_loop(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img, img2txt) -> dict[str, float]:
    """The original repo's itm_eval: an argsort per query, then a search for the ground truth in it."""
    image_ranks = np.zeros(len(scores_i2t))
    for image, score in enumerate(scores_i2t):
        order = np.argsort(score)[::-1]
        image_ranks[image] = min(np.where(order == caption)[0][0] for caption in img2txt[image])
    caption_ranks = np.zeros(len(scores_t2i))
    for caption, score in enumerate(scores_t2i):
        order = np.argsort(score)[::-1]
        caption_ranks[caption] = np.where(order == txt2img[caption])[0][0]
    result = {}
    for prefix, ranks in (("txt", image_ranks), ("img", caption_ranks)):
        recalls = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
        result |= {f"{prefix}_r{k}": recall for k, recall in zip((1, 5, 10), recalls)}
        result[f"{prefix}_r_mean"] = (recalls[0] + recalls[1] + recalls[2]) / 3
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


def _best_time(function: Callable[[], object], repeats: int = 3) -> float:
    """Fastest of a few calls after a warm-up one, which pays torch's first-call costs (~0.15 s)."""
    function()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return min(timings)


def bench_itm_eval(n_images: int, captions_per_image: int) -> None:
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((n_images, n_images * captions_per_image)).astype(np.float32)
    txt2img = np.arange(scores.shape[1]) // captions_per_image
    img2txt = [list(range(i * captions_per_image, (i + 1) * captions_per_image)) for i in range(n_images)]

    vectorised_seconds = _best_time(lambda: itm_eval(scores, scores.T, txt2img, img2txt))
    loop_seconds = _best_time(lambda: _itm_eval_loop(scores, scores.T, txt2img, img2txt))
    vectorised = itm_eval(scores, scores.T, txt2img, img2txt)
    looped = _itm_eval_loop(scores, scores.T, txt2img, img2txt)
    assert all(vectorised[key] == value for key, value in looped.items()), "itm_eval disagrees with the loop"
    print(f"itm_eval {scores.shape[0]} x {scores.shape[1]}: {vectorised_seconds * 1e3:.0f} ms, "
          f"original loop {loop_seconds * 1e3:.0f} ms ({loop_seconds / vectorised_seconds:.0f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=31_014)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, help="default: retrieval_metrics' default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--itm-eval-images", type=int, default=1000)
    # Where other processes share the cores, torch's waits between threads dominate small operations.
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_flickr(args.images, args.captions_per_image, args.dim, args.chunk_size, args.device)
    bench_itm_eval(args.itm_eval_images, args.captions_per_image)


if __name__ == "__main__":
    main()
