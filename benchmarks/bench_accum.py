"""accum_freq: peak memory and samples/s of one batch direct vs the same batch as k cached-feature micro-batches.

    python benchmarks/bench_accum.py [--phi openai/VIT-B-32] [--batch 256] [--accum 8] [--steps 3]
                                     [--device cuda] [--precision fp32|fp16|bf16]

Rows: direct, accum_freq=k, and each with gradient checkpointing. Speed is measured in one process with the
variants' steps interleaved (same machine load); peak memory in a fresh child process per variant (CUDA:
max_memory_allocated; CPU: growth of the peak RSS from after the imports), as benchmarks/bench_train.py does.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nets import build_model, get_config  # noqa: E402
from utils.device import PRECISIONS  # noqa: E402
from utils.finetune.accum import CachedBatch  # noqa: E402
from utils.train.loss import ClipLoss  # noqa: E402
from utils.train.optim import build_optimizer  # noqa: E402

from bench_train import _peak_rss_mib, inputs, training_step  # noqa: E402  (benchmarks/, this script's folder)


def make_step(model, device: torch.device, precision: str, accum: int):
    optimizer = build_optimizer(model, "adamw", 1e-5, 0.9, 0.1)
    if accum == 1:  # the whole batch at once, as bench_train.py times it
        return training_step(model, optimizer, ClipLoss(), device, precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step(pixels, tokens):
        CachedBatch(model, ClipLoss(), pixels, tokens, accum, device, PRECISIONS[precision]).backward(
            lambda loss: scaler.scale(loss).backward())
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def variants(accum: int) -> list[tuple[str, int, bool]]:
    return [("direct", 1, False), (f"accum_freq={accum}", accum, False), ("direct + ckpt", 1, True),
            (f"accum_freq={accum} + ckpt", accum, True)]


def measure_memory(phi: str, batch: int, accum: int, checkpointing: bool, device: str, precision: str) -> float:
    device = torch.device(device)
    base = _peak_rss_mib()
    torch.manual_seed(0)
    model = build_model(get_config(phi)).to(device).train()
    model.set_grad_checkpointing(checkpointing)
    step = make_step(model, device, precision, accum)
    pixels, tokens = inputs(model.config, batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step(pixels, tokens)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return _peak_rss_mib() - base


def memory_child(*args) -> float:
    code = (f"import sys; sys.argv=['x']; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import bench_accum as b; print(b.measure_memory(*{args!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phi", default="openai/VIT-B-32")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--accum", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    parser.add_argument("--no-ckpt", action="store_true", help="leave out the gradient-checkpointing rows")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(get_config(args.phi)).to(device).train()
    pixels, tokens = inputs(model.config, args.batch, device)
    rows = [row for row in variants(args.accum) if not (args.no_ckpt and row[2])]
    steps = {name: make_step(model, device, args.precision, k) for name, k, _ in rows}
    times = {name: [] for name, _, _ in rows}
    for i in range(args.steps + 1):
        for name, _, checkpointing in rows:
            model.set_grad_checkpointing(checkpointing)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            steps[name](pixels, tokens)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first round is warm-up
                times[name].append(time.perf_counter() - start)
    del model, steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"\n{args.phi}, batch {args.batch}, {args.device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"{args.precision}, median of {args.steps} steps after 1 warm-up; memory: peak of 2 steps in a fresh process")
    print(f"{'variant':<26}{'samples/s':>11}{'speed x':>9}{'peak MiB':>10}{'memory x':>10}")
    first = None
    for name, k, checkpointing in rows:
        speed = args.batch / statistics.median(times[name])
        memory = memory_child(args.phi, args.batch, k, checkpointing, args.device, args.precision)
        first = first or (speed, memory)
        print(f"{name:<26}{speed:>11.1f}{speed / first[0]:>9.2f}{memory:>10.0f}{memory / first[1]:>10.2f}")
        print(json.dumps({"variant": name, "samples_per_s": speed, "peak_mib": memory}), file=sys.stderr)


if __name__ == "__main__":
    main()
