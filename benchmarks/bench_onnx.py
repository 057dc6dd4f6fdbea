"""onnxruntime against PyTorch on this CPU: images/s and captions/s of the same weights, side by side.

    python benchmarks/bench_onnx.py [--phi tiny/VIT-T-8 openai/VIT-B-32] [--batch 1 32] [--reps 5] [--threads N]

Each phi gets seeded random weights, is exported as `predict.py --mode export_onnx` does (fp32; the export
prints its parity with PyTorch) and is timed in one process: PyTorch's `encode_image`/`encode_text` (the
packed text path, under inference_mode) against `OnnxCLIP`'s (onnxruntime, padding columns trimmed), taking
turns within each repetition so that load from other processes falls on both alike. Captions are 1024 varied
Flickr-like sentences (6-20 words), tokenised before timing. Prints medians and onnxruntime / PyTorch.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip import CLIP  # noqa: E402
from utils.export.onnx_export import export_files, write_files  # noqa: E402
from utils.export.onnx_predict import OnnxCLIP  # noqa: E402

_WORDS = ("a man woman dog cat child red blue green small large old young photo of on in the with near next to "
          "running sitting standing beach street park table grass water ball car bike tree building sky").split()


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 20))) for _ in range(n)]


def _once(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def bench(phi: str, batches: list[int], reps: int) -> list[tuple]:
    torch.manual_seed(0)
    model = CLIP(model_path="", phi=phi, cuda=False, precision="fp32")
    with tempfile.TemporaryDirectory() as folder:
        write_files(Path(folder), export_files(model, log=lambda line: print(f"  {phi} {line}")))
        onnx_model = OnnxCLIP(folder, threads=torch.get_num_threads())
    size = model.net.config.vision.image_size
    texts = captions(max(batches))
    rows = []
    for batch in batches:
        pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        tokens = model.tokenize(texts[:batch])
        work = {
            "images": (lambda: model.net.encode_image(pixels), lambda: onnx_model.encode_image(pixels.numpy())),
            "captions": (lambda: model.net.encode_text(tokens), lambda: onnx_model.encode_text(tokens.numpy())),
        }
        for kind, (torch_run, onnx_run) in work.items():
            torch_times, onnx_times = [], []
            with torch.inference_mode():
                torch_run(), onnx_run()
                for _ in range(reps):  # turns within each repetition
                    torch_times.append(_once(torch_run))
                    onnx_times.append(_once(onnx_run))
            torch_speed, onnx_speed = batch / float(np.median(torch_times)), batch / float(np.median(onnx_times))
            rows.append((phi, kind, batch, torch_speed, onnx_speed))
            print(f"  {phi} {kind} batch {batch}: PyTorch {torch_speed:.1f}/s, onnxruntime {onnx_speed:.1f}/s",
                  flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phi", nargs="+", default=["tiny/VIT-T-8", "openai/VIT-B-32"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0: PyTorch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [row for phi in args.phi for row in bench(phi, args.batch, args.reps)]
    import onnxruntime

    print(f"\ntorch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.reps}")
    print("| phi | per second | batch | PyTorch | onnxruntime | onnxruntime / PyTorch |\n|---|---|---:|---:|---:|---:|")
    for phi, kind, batch, torch_speed, onnx_speed in rows:
        print(f"| {phi} | {kind} | {batch} | {torch_speed:.1f} | {onnx_speed:.1f} | {onnx_speed / torch_speed:.2f}x |")


if __name__ == "__main__":
    main()
