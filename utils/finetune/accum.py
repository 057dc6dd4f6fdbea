"""Gradient accumulation that keeps every negative of the contrastive batch (`accum_freq`).

Summing the losses of k micro-batches is not batch B: each would only see B/k negatives. Instead,
every micro-batch is first encoded without gradients and its features kept; then each micro-batch is
encoded again with gradients and scored against the kept features of the others. The loss of pass j
has the value of the whole batch's loss, and its gradient reaches only micro-batch j's features, so
the k backward passes add up to the whole batch's gradient. `logit_scale` (and SigLIP's `logit_bias`) appear in
all k losses, so only one pass lets their gradient through (open_clip counts it k times).
"""
from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from utils.device import autocast
from utils.errors import UserError


def check_accum(accum_freq: int, local_batch: int, world_size: int) -> None:
    if accum_freq < 1:
        raise UserError(f"accum_freq {accum_freq} must be 1 (no accumulation) or more")
    if local_batch % accum_freq:
        per = f"{local_batch} per process ({world_size} processes)" if world_size > 1 else f"{local_batch}"
        divisors = [d for d in range(1, local_batch + 1) if local_batch % d == 0]
        raise UserError(f"accum_freq {accum_freq} does not divide the batch of {per}; choose one of "
                        f"{', '.join(map(str, divisors))}, or change batch_size")


def _no_sync(model, last: bool):
    # DDP averages gradients once, in the last backward pass.
    return model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()


class CachedBatch:
    """One optimiser step's batch split into `accum_freq` micro-batches, first encoded without gradients.

    `loss` is the whole batch's loss (for the finiteness check and the log); `backward(run_backward)` then
    runs the k gradient passes, `run_backward(loss)` being one backward (e.g. through a GradScaler).
    """

    def __init__(self, model, criterion, pixels: torch.Tensor, tokens: torch.Tensor, accum_freq: int, device,
                 dtype):
        self.model, self.criterion, self.device, self.dtype = model, criterion, device, dtype
        self.chunks = list(zip(pixels.chunk(accum_freq), tokens.chunk(accum_freq)))
        with torch.no_grad(), autocast(device, dtype):
            kept = [model(p, t) for p, t in self.chunks]
            self.images = [k[0] for k in kept]
            self.texts = [k[1] for k in kept]
            self.loss = criterion(torch.cat(self.images), torch.cat(self.texts), *kept[0][2:])

    def backward(self, run_backward) -> None:
        images, texts, k = self.images, self.texts, len(self.chunks)
        for j, (p, t) in enumerate(self.chunks):
            last = j == k - 1
            with _no_sync(self.model, last):
                with autocast(self.device, self.dtype):
                    image_j, text_j, *scalars = self.model(p, t)  # scale, and a SigLIP model's bias
                    loss_j = self.criterion(torch.cat(images[:j] + [image_j] + images[j + 1:]),
                                            torch.cat(texts[:j] + [text_j] + texts[j + 1:]),
                                            *(s if last else s.detach() for s in scalars))
                run_backward(loss_j)
