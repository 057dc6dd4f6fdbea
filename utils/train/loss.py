"""Symmetric InfoNCE over the global batch.

Each rank gathers every rank's features (with gradient) and scores only its own rows against all
columns. DDP then averages the per-rank gradients, which equals the gradient of the loss over the
whole batch: N processes with batch B/N train exactly like one process with batch B.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from utils.train.distributed import DistInfo


class _GatherWithGrad(torch.autograd.Function):
    """Every rank's rows, concatenated in rank order; the gradient flows back to the rows' own rank.

    Each rank's loss uses all rows, so the gradient of rank r's rows is the sum over ranks of their
    gradients for those rows: an all_reduce, then r's slice (gloo has no reduce_scatter). torch's
    `torch.distributed.nn.all_gather` did this too, and is deprecated.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        rows = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(rows, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    return _GatherWithGrad.apply(x) if info.enabled else x


class ClipLoss(nn.Module):
    def __init__(self, info: DistInfo = DistInfo()):
        super().__init__()
        self.info = info

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        all_images = gather_with_grad(image_features, self.info)
        all_texts = gather_with_grad(text_features, self.info)
        n = image_features.shape[0]
        labels = torch.arange(n, device=image_features.device) + n * self.info.rank
        logits_per_image = scale * image_features @ all_texts.t()  # local rows x global columns
        logits_per_text = scale * text_features @ all_images.t()
        return (F.cross_entropy(logits_per_image.float(), labels) + F.cross_entropy(logits_per_text.float(), labels)) / 2
