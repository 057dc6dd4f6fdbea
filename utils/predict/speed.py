"""mode="fps": how fast the loaded model encodes images and captions on this machine."""
from __future__ import annotations

import time

import numpy as np
import torch

CAPTION = "a photo of a dog running on the beach next to a red ball"


@torch.no_grad()
def encoding_speed(model, batch_sizes: tuple[int, ...] = (1, 32), repeats: int = 5) -> dict[str, dict[int, float]]:
    """{"images": {batch: per second}, "captions": {batch: per second}}, medians of `repeats` timed runs after
    one warm-up, random pixels and one real caption."""
    size = model.net.config.vision.image_size
    dtype = next(model.net.parameters()).dtype
    speeds: dict[str, dict[int, float]] = {"images": {}, "captions": {}}
    for batch in batch_sizes:
        pixels = torch.randn(batch, 3, size, size, device=model.device, dtype=dtype)
        tokens = model.tokenize([CAPTION] * batch).to(model.device)
        for kind, run in (("images", lambda: model.net.encode_image(pixels)),
                          ("captions", lambda: model.net.encode_text(tokens))):
            times = []
            for _ in range(repeats + 1):
                if model.device.type == "cuda":
                    torch.cuda.synchronize(model.device)
                started = time.perf_counter()
                run()
                if model.device.type == "cuda":
                    torch.cuda.synchronize(model.device)
                times.append(time.perf_counter() - started)
            speeds[kind][batch] = batch / float(np.median(times[1:]))
    return speeds


def format_speeds(speeds: dict[str, dict[int, float]], label: str) -> str:
    batches = sorted(speeds["images"])
    lines = [f"{label}", f"{'':<10}" + "".join(f"{'batch ' + str(b):>14}" for b in batches)]
    for kind in ("images", "captions"):
        lines.append(f"{kind:<10}" + "".join(f"{speeds[kind][b]:>12.1f}/s" for b in batches))
    return "\n".join(lines)
