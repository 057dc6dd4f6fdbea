"""SigLIP's text transformer: bidirectional attention over captions padded to the context length, the last
position's state projected out (open_clip's `TextTransformer` with `no_causal_mask`, `pool_type='last'`)."""
from __future__ import annotations

import torch
from torch import nn

from .configs import TextConfig
from .text_transformer import TokenTransformer
from .transformer import Pooled


class SiglipTextTower(TokenTransformer):
    """Keys as open_clip's `text.*`: `token_embedding`, `positional_embedding`, `transformer.resblocks.N.*`,
    `ln_final`, `text_projection.weight` (`.bias` with `config.proj_bias`). `config.projection=False` is the i18n
    SO400M's: its width is the embedding, with no projection at all. `config.activation` is "gelu" (SigLIP) or
    "gelu_tanh" (SigLIP 2); `config.eps` is every LayerNorm's (1e-6 in SigLIP's rows)."""

    def __init__(self, config: TextConfig, embed_dim: int):
        super().__init__(config, causal=False, eps=config.eps)
        projection = config.projection
        if not projection and config.width != embed_dim:
            raise ValueError(f"a text tower without projection gives width {config.width} features, not {embed_dim}")
        self.text_projection = nn.Linear(config.width, embed_dim, bias=config.proj_bias) if projection else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        self.init_body()
        if isinstance(self.text_projection, nn.Linear):
            nn.init.normal_(self.text_projection.weight, std=self.transformer.width ** -0.5)
            if self.text_projection.bias is not None:
                nn.init.zeros_(self.text_projection.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (N, context_length) ids, padded to the full length as SigLIP's tokenizers pad them.

        Attention is bidirectional and unmasked, so the pad tokens take part in every position, the pooled last one
        included: nothing can be trimmed, and captions must come padded as the weights were trained.
        """
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens per caption; this tower takes at most {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:length]  # N, L, width
        x = self.ln_final(self.transformer(x, pooled=Pooled(-1)))  # the last position's state alone: N, width
        return self.text_projection(x)  # N, embed_dim: the last position, as big_vision pools
