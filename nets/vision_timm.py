"""An image tower built by timm as open_clip's `TimmModel` builds it (a timm `trunk`, then a `head` that pools and
projects), so open_clip's `visual.trunk.*` and `visual.head.*` keys load as they are (SigLIP, ConvNeXt, EVA)."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .configs import VisionConfig


class TimmVisionTower(nn.Module):
    """open_clip's `TimmModel(model_name, embed_dim, pool=pool, proj=proj, proj_bias=proj_bias)`, minus its training
    settings (drop path, dropout 0 at inference). `overrides` go to `timm.create_model` (a row's own sizes, smaller
    ones for tests); open_clip passes none, so a published row passes timm's defaults or equal values."""

    def __init__(self, model_name: str, embed_dim: int, image_size: int, pool: str = "avg", proj: str = "linear",
                 proj_bias: bool = False, overrides: dict | None = None):
        super().__init__()
        import timm  # imported here: only these towers need it, and it costs a second
        from timm.layers import AttentionPool2d, Mlp, RotAttentionPool2d

        self.model_name = model_name
        overrides = overrides or {}
        self.image_size = image_size
        self.output_dim = embed_dim
        if proj not in ("linear", "mlp", "none", "", None):
            raise ValueError(f"timm tower projection {proj!r} is not one of linear, mlp, none")
        custom_pool = pool in ("abs_attn", "rot_attn")
        if proj not in ("linear", "mlp") and not custom_pool:
            # timm's own classifier is the projection (EVA: `trunk.head`), or nothing at all for proj='none' (SigLIP).
            self.trunk = timm.create_model(model_name, pretrained=False, num_classes=0 if proj == "none" else embed_dim,
                                           global_pool=pool, **overrides)
            width = embed_dim
        else:
            self.trunk = timm.create_model(model_name, pretrained=False, **overrides)
            feat_size = self.trunk.default_cfg.get("pool_size", None)
            if custom_pool:
                self.trunk.reset_classifier(0, global_pool="")
            else:  # an empty pool keeps the trunk's own (ConvNeXt's average + LayerNorm), as open_clip does
                self.trunk.reset_classifier(0, **(dict(global_pool=pool) if pool else {}))
            width = self.trunk.num_features
        head = OrderedDict()
        if pool == "abs_attn":
            head["pool"] = AttentionPool2d(width, feat_size=feat_size, out_features=embed_dim)
            width = embed_dim
        elif pool == "rot_attn":
            head["pool"] = RotAttentionPool2d(width, out_features=embed_dim)
            width = embed_dim
        if proj == "linear":
            head["drop"] = nn.Dropout(0.0)
            head["proj"] = nn.Linear(width, embed_dim, bias=proj_bias)
        elif proj == "mlp":
            head["mlp"] = Mlp(width, 2 * embed_dim, embed_dim, drop=(0.0, 0.0), bias=(True, proj_bias))
        self.head = nn.Sequential(head)
        if proj == "none" and self.trunk.num_features != embed_dim:
            raise ValueError(f"a timm tower with no projection gives its trunk's {self.trunk.num_features} features: "
                             f"embed_dim must be that, not {embed_dim}")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (N, 3, H, W), normalised as the weights were trained (the row's pretrained tag says how)."""
        return self.head(self.trunk(pixels))  # N, embed_dim


def timm_tower(config: VisionConfig, embed_dim: int) -> TimmVisionTower:
    """The row's timm tower. `timm_kwargs` None (SigLIP's rows and their saved records): the row's ViT sizes are the
    overrides (timm's `vit_*_siglip_*` entry points take them; equal to timm's for the published models), and its
    activation timm's own exact GELU ("gelu", as open_clip builds the trunk) or tanh GELU ("gelu_tanh": transformers'
    SiglipModel folders say it)."""
    if config.timm_kwargs is None:
        acts = {"gelu": None, "gelu_tanh": "gelu_tanh"}
        if config.activation not in acts:
            raise ValueError(f"a timm tower is built with {' or '.join(acts)}, not {config.activation!r}")
        overrides = dict(img_size=config.image_size, patch_size=config.patch_size, embed_dim=config.width,
                         depth=config.layers, num_heads=config.heads, mlp_ratio=config.mlp_ratio,
                         **({"act_layer": acts[config.activation]} if acts[config.activation] else {}))
    else:
        overrides = dict(config.timm_kwargs)
    return TimmVisionTower(config.timm_model_name, embed_dim, config.image_size, pool=config.timm_pool,
                           proj=config.timm_proj, proj_bias=config.timm_proj_bias, overrides=overrides)
