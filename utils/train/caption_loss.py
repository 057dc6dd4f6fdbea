"""CoCa's training loss, as open_clip 3.3 trains it (`CoCaLoss`): contrastive_weight x the contrastive loss plus
caption_weight x the decoder's cross-entropy on each caption's next tokens (labels `tokens[:, 1:]`, padding ignored).

The cross-entropy is a mean over the global batch's caption tokens: each rank sums its own tokens' losses and divides
by the count of all ranks' tokens, times the number of ranks, since DDP averages the ranks' gradients (open_clip
averages each rank's own mean instead, the same when every rank holds as many tokens). Micro-batches
(`accum_freq`) add up the same way: each pass differentiates its own tokens' sum, the others' kept as numbers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nets.coca import PAD_ID
from utils.train.distributed import DistInfo

# open_clip's defaults (--coca-caption-loss-weight, --coca-contrastive-loss-weight).
CAPTION_LOSS_WEIGHT, CONTRASTIVE_LOSS_WEIGHT = 2.0, 1.0


class CoCaLoss(nn.Module):
    """`contrastive`: utils/train/loss.py's loss of the run (CLIP's softmax, as open_clip's CoCaLoss, or the sigmoid).
    Returns the two weighted terms by open_clip's names; the training loss is their sum."""

    def __init__(self, contrastive: nn.Module, caption_weight: float = CAPTION_LOSS_WEIGHT,
                 contrastive_weight: float = CONTRASTIVE_LOSS_WEIGHT, info: DistInfo = DistInfo(), pad_id: int = PAD_ID):
        super().__init__()
        self.contrastive, self.info, self.pad_id = contrastive, info, pad_id
        self.caption_weight, self.contrastive_weight = caption_weight, contrastive_weight

    def caption_sum(self, logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the cross-entropy over the captions' non-padding next tokens, their count): logits (N, L - 1,
        vocab) from `model(pixels, tokens, captions=True)`, tokens (N, L)."""
        labels = tokens[:, 1:]
        total = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=self.pad_id, reduction="sum")
        return total, (labels != self.pad_id).sum()

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, scalars: tuple,
                caption_total: torch.Tensor, caption_count: torch.Tensor) -> dict[str, torch.Tensor]:
        count = caption_count.detach().clone()
        if self.info.enabled:
            torch.distributed.all_reduce(count)
        caption = caption_total * self.info.world_size / count.clamp(min=1)
        # Computed even at weight 0 (open_clip skips it): every parameter then still takes part in DDP's backward.
        contrastive = self.contrastive(image_features, text_features, *scalars)
        return {"contrastive_loss": self.contrastive_weight * contrastive, "caption_loss": self.caption_weight * caption}


def batch_losses(model, criterion: nn.Module, pixels: torch.Tensor,
                 tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch's training loss and its named terms ({} for a contrastive loss alone): `criterion(*model(...))`,
    with a CoCaLoss given the decoder's logits too."""
    if not isinstance(criterion, CoCaLoss):
        return criterion(*model(pixels, tokens)), {}
    image_features, text_features, *scalars, logits = model(pixels, tokens, captions=True)
    parts = criterion(image_features, text_features, tuple(scalars), *criterion.caption_sum(logits, tokens))
    return sum(parts.values()), parts
