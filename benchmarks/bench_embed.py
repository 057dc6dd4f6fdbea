"""predict.py mode="embed" throughput: images/s with 1 process and with N gloo processes under torchrun.

    python benchmarks/bench_embed.py [--images 128] [--phi openai/VIT-B-32] [--processes 2] [--batch_size 32]

Makes the toy caption set (datasets/make_toy.py) of `--images` images and embeds its caption file (images and
captions) into a fresh folder, first in one process with all threads, then under torchrun with `--processes`
processes of one thread each, from random weights of `phi`. Times are whole commands (interpreter start and model
build included, so more images give steadier rates); the outputs of the two runs are compared row by row.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--phi", default="openai/VIT-B-32")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()

    import torch

    from utils.data.toy import make_toy_dataset
    from nets import build_model, get_config

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_toy_dataset(tmp / "toy", n_train=args.images, n_val=2, seed=0)
        torch.manual_seed(0)  # one weight file: each process building its own random weights would differ
        torch.save(build_model(get_config(args.phi)).state_dict(), tmp / "weights.pth")
        common = ["--mode", "embed", "--model_path", str(tmp / "weights.pth"), "--phi", args.phi, "--caption_file",
                  str(tmp / "toy" / "en_train.json"), "--batch_size", str(args.batch_size), "--num_workers", "1",
                  "--part_size", str(max(1, args.images // (4 * args.processes))), "--Cuda", "false"]
        threads = os.cpu_count() or 1
        one = run([sys.executable, "predict.py", *common, "--embeddings_dir", str(tmp / "one")],
                  {**os.environ, "OMP_NUM_THREADS": str(threads)})
        many = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
                    "--master_port", "29581", "predict.py", *common, "--distributed", "true", "--embeddings_dir",
                    str(tmp / "many")], {**os.environ, "OMP_NUM_THREADS": "1"})
        same = all(np.allclose(np.load(a), np.load(b), atol=1e-3)
                   for a, b in zip(sorted((tmp / "one").rglob("*.npy")), sorted((tmp / "many").rglob("*.npy"))))
        load = os.getloadavg() if hasattr(os, "getloadavg") else "unknown"
        print(f"{args.images} toy images x 5 captions, {args.phi} (seeded random weights), batch {args.batch_size}, "
              f"{threads} cores; load {load}")
        print("| processes | threads each | seconds (whole command) | images/s |")
        print("|---|---|---|---|")
        print(f"| 1 | {threads} | {one:.1f} | {args.images / one:.1f} |")
        print(f"| {args.processes} | 1 | {many:.1f} | {args.images / many:.1f} |")
        print(f"outputs equal within float16 rounding: {same}")


if __name__ == "__main__":
    main()
