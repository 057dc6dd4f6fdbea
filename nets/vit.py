"""OpenAI's Vision Transformer image tower (keys under `visual.`)."""
from __future__ import annotations

import torch
from torch import nn

from .configs import VisionConfig
from .transformer import Pooled, Transformer


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig, embed_dim: int):
        super().__init__()
        width = config.width
        grid = config.image_size // config.patch_size
        self.image_size = config.image_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width) if config.ln_pre else nn.Identity()
        self.pool = config.pool
        self.transformer = Transformer(width, config.layers, config.heads, mlp_width=config.mlp_width,
                                       activation=config.activation)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        scale = self.conv1.out_channels ** -0.5
        for p in (self.class_embedding, self.positional_embedding, self.proj):
            nn.init.normal_(p, std=scale)
        self.transformer.init_weights()

    def set_grad_checkpointing(self, enable: bool) -> None:
        self.transformer.grad_checkpointing = enable

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels.to(self.conv1.weight.dtype))  # N, width, grid, grid
        x = x.flatten(2).transpose(1, 2)  # N, grid*grid, width
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        if self.pool == "avg":
            pooled = self.transformer(self.ln_pre(x))[:, 1:].mean(dim=1)
        else:  # the class token's state alone: N, width
            pooled = self.transformer(self.ln_pre(x), pooled=Pooled(0))
        return self.ln_post(pooled) @ self.proj
