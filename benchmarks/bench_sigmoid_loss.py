"""The sigmoid loss's forward + backward: utils/train/loss.SigLipLoss vs open_clip's SigLipLoss, same features.

    python benchmarks/bench_sigmoid_loss.py [--batch 256 1024] [--dim 768] [--steps 20] [--device cpu]

One process, the two interleaved step by step so both see the same machine load; the median of `steps`.
A training step's cost is the towers'; this is the part the loss adds on top of them.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.train.loss import SigLipLoss  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    from open_clip.loss import SigLipLoss as OpenClipSigLipLoss

    device = torch.device(args.device)
    for batch in args.batch:
        g = torch.Generator().manual_seed(0)
        images = F.normalize(torch.randn(batch, args.dim, generator=g), dim=-1).to(device).requires_grad_(True)
        texts = F.normalize(torch.randn(batch, args.dim, generator=g), dim=-1).to(device).requires_grad_(True)
        scale = torch.tensor(math.log(10.0), device=device, requires_grad=True)
        bias = torch.tensor(-10.0, device=device, requires_grad=True)
        times = {"ours": [], "open_clip": []}
        losses = {}
        for i in range(args.steps + 1):
            for name, loss_fn in (("ours", SigLipLoss()), ("open_clip", OpenClipSigLipLoss())):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                loss = loss_fn(images, texts, scale.exp(), bias)
                loss.backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
                losses[name] = loss.item()
        ours, peer = statistics.median(times["ours"]), statistics.median(times["open_clip"])
        print(f"batch {batch} x {args.dim} on {device}: ours {ours * 1e3:.2f} ms, open_clip {peer * 1e3:.2f} ms "
              f"(open_clip / ours = {peer / ours:.2f}); loss {losses['ours']:.6f} vs {losses['open_clip']:.6f}")


if __name__ == "__main__":
    main()
