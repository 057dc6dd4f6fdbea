"""An image tower built by timm (SigLIP's `vit_*_siglip_*`: no class token, no pre-norm, an attention-pool head),
kept under `trunk` as open_clip's `TimmModel` keeps it, so open_clip's `visual.trunk.*` keys load as they are."""
from __future__ import annotations

import torch
from torch import nn


class TimmVisionTower(nn.Module):
    """`timm.create_model(model_name, num_classes=0, global_pool=pool)`, as open_clip builds it for `timm_proj='none'`:
    the trunk's pooled features are the embedding, with no projection after them. `overrides` go to timm too (a
    smaller width or depth for tests); open_clip's configs set none."""

    def __init__(self, model_name: str, pool: str = "map", **overrides):
        super().__init__()
        import timm  # imported here: only these towers need it, and it costs a second

        self.model_name = model_name
        self.trunk = timm.create_model(model_name, pretrained=False, num_classes=0, global_pool=pool, **overrides)
        self.image_size = self.trunk.patch_embed.img_size[0]
        self.output_dim = self.trunk.num_features

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (N, 3, H, W), normalised as the weights were trained (SigLIP: mean = std = 0.5)."""
        return self.trunk(pixels)  # N, output_dim
