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


def timm_tower(model_name: str, image_size: int, patch_size: int, width: int, layers: int, heads: int,
               mlp_ratio: float, act_layer: str | None = None) -> TimmVisionTower:
    """timm's `model_name` family at these sizes: a row's own sizes, equal to timm's for the published models (timm's
    entry points take them as overrides), smaller for tests. `act_layer`: timm's name of the MLPs' activation, None
    for the family's own (transformers' SiglipModel folders say tanh GELU)."""
    return TimmVisionTower(model_name, img_size=image_size, patch_size=patch_size, embed_dim=width, depth=layers,
                           num_heads=heads, mlp_ratio=mlp_ratio, **({"act_layer": act_layer} if act_layer else {}))

