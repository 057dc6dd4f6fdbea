"""OpenAI's causal text transformer: BPE tokens in, the EOT token's state projected out."""
from __future__ import annotations

import torch
from torch import nn

from .configs import TextConfig
from .text_transformer import TokenTransformer
from .transformer import Packing


class OpenAITextTower(TokenTransformer):
    def __init__(self, config: TextConfig, embed_dim: int):
        super().__init__(config, causal=True)
        self.text_projection = nn.Parameter(torch.empty(config.width, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        # OpenAI's order of the random draws (the projection before the blocks), so seeded inits stay the same.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)
        self.transformer.init_weights()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (N, L) BPE ids, zero-padded after EOT, the largest id in each row."""
        eot = tokens.argmax(dim=-1)
        # The mask is causal, so positions after a row's EOT never reach it: dropping them is exact.
        # The rest are packed, so padding costs attention alone, not the linear layers.
        length = int(eot.max()) + 1
        packing = Packing(torch.arange(length, device=tokens.device) <= eot[:, None])  # keep: N, length
        x = packing.pack(self.token_embedding(tokens[:, :length]) + self.positional_embedding[:length])  # T, width
        x = self.transformer(x, packing)
        # Rows are packed in order, so each row's EOT is the last of its tokens.
        last = (eot + 1).cumsum(dim=0) - 1
        return self.ln_final(x[last]) @ self.text_projection

    def forward_padded(self, tokens: torch.Tensor) -> torch.Tensor:
        """`forward` without packing: every one of the L given positions runs, under the causal mask.

        Equal to `forward` (the mask is causal, so padding after EOT never reaches it) but with no
        data-dependent shapes, which is what a traced export (ONNX) needs; L is at most context_length.
        """
        eot = tokens.argmax(dim=-1)
        x = self.token_embedding(tokens) + self.positional_embedding[:tokens.shape[1]]  # N, L, width
        x = self.transformer(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]  # N, width: each row's EOT state
        return self.ln_final(x) @ self.text_projection
