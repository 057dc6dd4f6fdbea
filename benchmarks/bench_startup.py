"""Start-up of one image: a fresh process per run, from a weight file to its first answers, with each runtime.

    python benchmarks/bench_startup.py [--phi openai/VIT-B-32] [--runs 3] [--calls 12] [--threads 2]

What `predict.py` does for one image: import, build `CLIP` from a weight file, then `detect_image` on one 400x300
photo (sklearn's) and two captions, `--calls` times. Runs `runtime="torch"` and `runtime="onnxruntime"` in turn,
each in a new process; onnxruntime first with an empty export cache (the first run ever: the export is written on
the tower's third call), then `--runs` times with that cache. Reports per run: seconds to import and load, the first
answer, the second and third, the median of the rest, and the whole process from start to exit (the runtime waits at
exit for a session still being opened). Same seeded random weights for every run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(weights: str, phi: str, runtime: str, calls: int) -> None:
    """One run, timed from after the interpreter started; prints its times as one JSON line."""
    started = time.perf_counter()
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from clip import CLIP

    model = CLIP(model_path=weights, phi=phi, cuda=False, runtime=runtime)
    loaded = time.perf_counter() - started
    image = Image.fromarray(load_sample_images().images[0]).resize((400, 300))
    texts = ["a photo of a temple", "a photo of a flower"]
    answers = []
    for _ in range(calls):
        start = time.perf_counter()
        model.detect_image(image, texts)
        answers.append(time.perf_counter() - start)
    print(json.dumps({"loaded": loaded, "answers": answers}))


def run(args, weights: Path, runtime: str, cache: Path) -> dict:
    env = {**os.environ, "CLIP_CACHE": str(cache), "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, __file__, "--child", str(weights), "--phi", args.phi, "--runtime", runtime,
               "--calls", str(args.calls)]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    whole = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"{runtime} run failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    times = json.loads(result.stdout.strip().splitlines()[-1])
    return {**times, "whole": whole}


def row(label: str, times: dict) -> str:
    a = times["answers"]
    rest = statistics.median(a[3:]) if len(a) > 3 else float("nan")
    return (f"| {label} | {times['loaded']:.2f} | {a[0]:.2f} | {a[1]:.2f} | {a[2]:.2f} | {rest * 1000:.0f} ms | "
            f"{times['whole']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phi", default="openai/VIT-B-32")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--runtime", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.phi, args.runtime, args.calls)
    from nets.ort import LOOKUP_AFTER

    if args.calls <= LOOKUP_AFTER:
        parser.error(f"--calls must be more than {LOOKUP_AFTER} (the export is looked up on a tower's call "
                     f"{LOOKUP_AFTER} and written on the next)")

    import torch

    from nets import build_model, get_config

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        torch.save(build_model(get_config(args.phi)).state_dict(), tmp / "weights.pth")
        print(f"{args.phi}, {args.threads} threads, {args.calls} calls of detect_image(one 400x300 photo, 2 captions) "
              f"per process; load average {os.getloadavg()[0]:.1f}")
        print("| run | import + load s | 1st answer s | 2nd s | 3rd s | median of the rest | whole process s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        cache = tmp / "cache"
        print(row("onnxruntime, first run ever (exports)", run(args, tmp / "weights.pth", "onnxruntime", cache)),
              flush=True)
        for i in range(args.runs):
            print(row(f"torch #{i + 1}", run(args, tmp / "weights.pth", "torch", cache)), flush=True)
            print(row(f"onnxruntime, cached #{i + 1}", run(args, tmp / "weights.pth", "onnxruntime", cache)),
                  flush=True)
        print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
