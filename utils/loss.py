"""Symmetric InfoNCE over the global batch.

Each rank gathers every rank's features (with gradient) and scores only its own rows against all
columns. DDP then averages the per-rank gradients, which equals the gradient of the loss over the
whole batch: N processes with batch B/N train exactly like one process with batch B.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import DistInfo


def gather_with_grad(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return x
    import torch.distributed.nn as dist_nn

    return torch.cat(dist_nn.all_gather(x), dim=0)


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
