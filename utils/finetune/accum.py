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

    `loss` is the whole batch's loss (for the finiteness check and the log), `parts` its named terms (a CoCa's);
    `backward(run_backward)` then runs the k gradient passes, `run_backward(loss)` being one backward (e.g. through a
    GradScaler). A CoCa's caption term keeps each micro-batch's token sum and count, not its logits (N x L x vocab).
    """

    def __init__(self, model, criterion, pixels: torch.Tensor, tokens: torch.Tensor, accum_freq: int, device,
                 dtype):
        self.model, self.criterion, self.device, self.dtype = model, criterion, device, dtype
        # utils/train/caption_loss.CoCaLoss, known by its method: that layer sits above this one.
        self.captions = hasattr(criterion, "caption_sum")
        self.chunks = list(zip(pixels.chunk(accum_freq), tokens.chunk(accum_freq)))
        with torch.no_grad(), autocast(device, dtype):
            kept = [self._forward(p, t) for p, t in self.chunks]
            self.images = [k[0] for k in kept]
            self.texts = [k[1] for k in kept]
            self.sums = [k[3] for k in kept]
            self.loss, self.parts = self._loss(self.images, self.texts, kept[0][2], self.sums)

    def _forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple:
        """(image features, text features, scalars, the caption term's (sum, count) or None)."""
        if not self.captions:
            image, text, *scalars = self.model(pixels, tokens)
            return image, text, tuple(scalars), None
        image, text, *scalars, logits = self.model(pixels, tokens, captions=True)
        return image, text, tuple(scalars), self.criterion.caption_sum(logits, tokens)

    def _loss(self, images: list, texts: list, scalars: tuple, sums: list) -> tuple[torch.Tensor, dict]:
        if not self.captions:
            return self.criterion(torch.cat(images), torch.cat(texts), *scalars), {}
        parts = self.criterion(torch.cat(images), torch.cat(texts), scalars, sum(s[0] for s in sums),
                               sum(s[1] for s in sums))
        return sum(parts.values()), parts

    def backward(self, run_backward) -> None:
        images, texts, sums, k = self.images, self.texts, self.sums, len(self.chunks)
        for j, (p, t) in enumerate(self.chunks):
            last = j == k - 1
            with _no_sync(self.model, last):
                with autocast(self.device, self.dtype):
                    image_j, text_j, scalars, sum_j = self._forward(p, t)  # scale, and a SigLIP model's bias
                    loss_j, _ = self._loss(images[:j] + [image_j] + images[j + 1:],
                                           texts[:j] + [text_j] + texts[j + 1:],
                                           tuple(s if last else s.detach() for s in scalars),
                                           sums[:j] + [sum_j] + sums[j + 1:])
                run_backward(loss_j)
