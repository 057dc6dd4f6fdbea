"""OpenAI's ModifiedResNet image tower (RN50 ... RN50x64): a ResNet whose feature map is pooled by attention.

It differs from torchvision's ResNet in three ways that change every feature: a stem of three 3x3
convolutions with an average pool instead of one 7x7 with a max pool; strided blocks that average-pool
before their 1x1 convolutions instead of striding them (anti-aliased); and an attention pool (the mean of
the final grid as query, every grid cell as key and value) instead of global average pooling. Keys are
OpenAI's (`visual.layer1.0.conv1`, `visual.attnpool.q_proj`, ...), so its weights load strictly.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .configs import VisionConfig
from .transformer import sdpa

# The stem halves the image twice, layers 2 to 4 once each: the attention pool sees an image_size / 32 grid.
STRIDE = 32


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = nn.Identity()
        if stride > 1 or inplanes != out:
            # "-1", "0", "1" are OpenAI's names; the pool has no weights, so only the last two reach a file.
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                ("1", nn.BatchNorm2d(out)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.avgpool(F.relu(self.bn2(self.conv2(out))))
        return F.relu(self.bn3(self.conv3(out)) + self.downsample(x))


class AttentionPool2d(nn.Module):
    """One multi-head attention whose only query is the mean of the grid; its output is the image feature."""

    def __init__(self, grid: int, width: int, heads: int, output_dim: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"ResNet feature width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # N, grid*grid, width
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        n, length, width = x.shape
        head_width = width // self.heads
        # Only the mean token's output is used, so it is the only query: the other rows would be discarded.
        q = self.q_proj(x[:, :1]).view(n, 1, self.heads, head_width).transpose(1, 2)  # N, H, 1, hd
        k = self.k_proj(x).view(n, length, self.heads, head_width).transpose(1, 2)  # N, H, L, hd
        v = self.v_proj(x).view(n, length, self.heads, head_width).transpose(1, 2)
        out = sdpa(q, k, v)  # N, H, 1, hd
        return self.c_proj(out.reshape(n, width))


class ModifiedResNet(nn.Module):
    def __init__(self, config: VisionConfig, embed_dim: int):
        super().__init__()
        if config.image_size % STRIDE:
            raise ValueError(f"a ResNet tower needs an image_size divisible by {STRIDE}, not {config.image_size}")
        width = config.width
        self.image_size = config.image_size
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        for i, blocks in enumerate(config.layers):
            planes = width * 2 ** i
            stage = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            stage += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes * Bottleneck.expansion
        self.attnpool = AttentionPool2d(config.image_size // STRIDE, inplanes, config.heads, embed_dim)
        self.init_weights()

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def init_weights(self) -> None:
        # OpenAI's scheme: convolutions keep PyTorch's default; each residual branch starts at zero (its
        # last BatchNorm's gain), so a fresh network is a chain of its shortcuts.
        pool = self.attnpool
        width = pool.c_proj.in_features
        nn.init.normal_(pool.positional_embedding, std=width ** -0.5)
        for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            nn.init.normal_(linear.weight, std=width ** -0.5)
        for stage in self.stages:
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def set_grad_checkpointing(self, enable: bool) -> None:
        self.grad_checkpointing = enable

    def stem(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(pixels.to(self.conv1.weight.dtype))))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.avgpool(F.relu(self.bn3(self.conv3(x))))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixels)  # N, width, S/4, S/4
        for stage in self.stages:
            for block in stage:
                # Recomputing a block whose BatchNorms update their statistics would update them twice,
                # so blocks are recomputed only while the statistics are frozen (eval mode).
                if self.grad_checkpointing and torch.is_grad_enabled() and not block.bn1.training:
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        return self.attnpool(x)  # N, embed_dim
