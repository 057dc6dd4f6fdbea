"""The pre-LayerNorm transformer shared by OpenAI's image and text towers.

Parameter names match OpenAI's `nn.MultiheadAttention`-based blocks (`attn.in_proj_weight`,
`attn.out_proj`, `mlp.c_fc`, ...), so OpenAI state dicts load with strict=True, while the math
runs through `scaled_dot_product_attention` on batch-first tensors.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


QUICK_GELU = 1.702


class QuickGELU(nn.Module):
    # OpenAI trained with this sigmoid approximation; exact GELU would shift every feature.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU * x)


# Exact GELU is what open_clip's non-OpenAI weights (LAION, DataComp, ...) and transformers' "gelu" use.
# SigLIP 2's text towers use the tanh approximation.
_ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU, "gelu_tanh": partial(nn.GELU, approximate="tanh")}


class Packing:
    """Rows of different lengths packed as (T, width) tokens, and back to zero-padded (N, L, width).

    Only attention needs the padded layout; every other op runs on the T real tokens. Exact where each
    row keeps a prefix and attention is causal: the zeros padded in after a prefix never reach it.
    """

    def __init__(self, keep: torch.Tensor):
        self.shape = keep.shape  # N, L
        self.index = keep.flatten().nonzero().squeeze(1)  # the one host sync, not one per layer

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(0, 1).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        padded = x.new_zeros(self.shape[0] * self.shape[1], x.shape[-1]).index_copy(0, self.index, x)
        return padded.view(*self.shape, x.shape[-1])

    unpad = pack


class Pooled:
    """The one position per row whose output a tower reads (ViT's class token, a caption's pooled token): the last
    block computes that row alone (its attention for one query, its projection and MLP), while keys and values still
    come from every position. Exact: no other output of the last block reaches the features. `positions` are the
    rows' places in the (N, L) layout that attention sees: one int for every row (0: ViT's class token, -1: the
    last) or an (N,) tensor; `rows` index the block's input instead where it is packed (T, width) tokens; `mask`
    (N, 1, 1, L) the keys each may attend (None: all)."""

    def __init__(self, positions: int | torch.Tensor = 0, rows: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None):
        self.positions, self.rows, self.mask = positions, rows, mask

    def _at(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, ...) -> (N, ...): each row's pooled position."""
        if isinstance(self.positions, int):
            return x[:, self.positions]
        return x[torch.arange(x.shape[0], device=x.device), self.positions]

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        """(N, H, L, hd) -> (N, H, 1, hd): the pooled position's query of each row."""
        return self._at(q.transpose(1, 2)).unsqueeze(2)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The block input's pooled rows: (N, width)."""
        return x[self.rows] if self.rows is not None else self._at(x)


def split_heads(x: torch.Tensor, parts: int, heads: int) -> torch.Tensor:
    """A fused projection's output (N, L, parts x width) as (parts, N, heads, L, head width): q, k and v (or k and
    v), each split into its heads, the layout scaled_dot_product_attention takes."""
    n, length, width = x.shape[0], x.shape[1], x.shape[2] // parts
    return x.view(n, length, parts, heads, width // heads).permute(2, 0, 3, 1, 4)


def attend(qkv: torch.Tensor, heads: int, causal: bool, packing: Packing | None = None,
           mask: torch.Tensor | None = None, pooled: Pooled | None = None) -> torch.Tensor:
    """Multi-head attention of the fused projection's output `qkv` (N, L, 3 x width), or (T, 3 x width) tokens that
    `packing` kept, before the output projection: (N, L, width) or (T, width); with `pooled`, its rows alone (N,
    width). `mask`: a boolean attention mask (True attends) instead of `causal`."""
    if packing is not None:
        qkv = packing.pad(qkv)
    n, length, width = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    qkv = split_heads(qkv, 3, heads)  # 3, N, H, L, hd
    if pooled is not None:
        # One query per row; causal attention from a row's pooled token is its mask over the keys.
        out = sdpa(pooled.queries(qkv[0]), qkv[1], qkv[2], attn_mask=pooled.mask)
        return out.reshape(n, width)  # N, H, 1, hd -> N, width
    out = sdpa(qkv[0], qkv[1], qkv[2], attn_mask=mask, is_causal=causal and mask is None)
    out = out.transpose(1, 2).reshape(n, length, width)
    return out if packing is None else packing.unpad(out)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
         is_causal: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention; bf16 on the CPU without autograd attended in fp32 and cast back: PyTorch's
    bf16 kernel there is the slower one at these sizes (in a caption's tower 41 against 23 us a call, in an image's
    146 against 90; benchmarks/README.md, "bf16 attention in fp32"). `attn_mask`: boolean (True attends)."""
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and not (q.requires_grad or k.requires_grad
                                                                      or v.requires_grad):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                              is_causal=is_causal).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


class Attention(nn.Module):
    # The QKV projection's matmul; nets/fast.py swaps in oneDNN's for CPU inference.
    project = staticmethod(F.linear)

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool, packing: Packing | None = None,
                mask: torch.Tensor | None = None, pooled: Pooled | None = None) -> torch.Tensor:
        """`mask`: a boolean attention mask (True attends) instead of `causal` (CoCa's text tower's, nets/coca.py).
        `pooled`: the output of its rows alone, (N, width)."""
        qkv = self.project(x, self.in_proj_weight, self.in_proj_bias)
        return self.out_proj(attend(qkv, self.heads, causal, packing, mask, pooled))

    def step(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None,
             mask: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One new position per row, x (N, 1, width), attending to the positions before it (`past`: their keys and
        values, each (N, heads, P, head width)) and to itself: decoding with a key-value cache. Returns its output
        (N, 1, width) and the keys and values with its own appended. `mask` (N, 1, 1, P + 1): the keys it may attend
        (None: all of them, which is causal attention for the newest position)."""
        qkv = self.project(x, self.in_proj_weight, self.in_proj_bias)
        n, width = qkv.shape[0], qkv.shape[2] // 3
        q, k, v = split_heads(qkv, 3, self.heads)  # each N, H, 1, hd
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = sdpa(q, k, v, attn_mask=mask)
        return self.out_proj(out.reshape(n, 1, width)), (k, v)  # N, H, 1, hd is N, 1, width in memory


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int, activation: str = "quick_gelu", eps: float = 1e-5):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {', '.join(_ACTIVATIONS)}")
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_width)),
            ("gelu", _ACTIVATIONS[activation]()),
            ("c_proj", nn.Linear(mlp_width, width)),
        ]))

    def forward(self, x: torch.Tensor, causal: bool = False, packing: Packing | None = None,
                pooled: Pooled | None = None) -> torch.Tensor:
        if pooled is None:
            x = x + self.attn(self.ln_1(x), causal, packing)
        else:
            x = pooled.take(x) + self.attn(self.ln_1(x), causal, packing, pooled=pooled)  # N, width
        return x + self.mlp(self.ln_2(x))

    def step(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None,
             mask: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """`forward` of one new position per row (N, 1, width) with a key-value cache (`Attention.step`)."""
        out, past = self.attn.step(self.ln_1(x), past, mask)
        x = x + out
        return x + self.mlp(self.ln_2(x)), past


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, causal: bool = False, mlp_width: int | None = None,
                 activation: str = "quick_gelu", eps: float = 1e-5):
        super().__init__()
        self.width = width
        self.causal = causal
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_width or 4 * width, activation, eps)
                                        for _ in range(layers)])

    def forward(self, x: torch.Tensor, packing: Packing | None = None, pooled: Pooled | None = None) -> torch.Tensor:
        """x: (N, L, width), batch first; or (T, width), the tokens that `packing` kept. With `pooled`, the last
        block's output at those rows alone: (N, width)."""
        last = len(self.resblocks) - 1
        for i, block in enumerate(self.resblocks):
            rows = pooled if i == last else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, self.causal, packing, rows, use_reentrant=False)
            else:
                x = block(x, self.causal, packing, rows)
        return x

    def init_weights(self) -> None:
        # OpenAI's scheme: residual projections shrink with depth so the stream's variance stays put.
        attn_std = self.width ** -0.5
        proj_std = attn_std * (2 * len(self.resblocks)) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.zeros_(block.mlp.c_fc.bias)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.zeros_(block.mlp.c_proj.bias)
