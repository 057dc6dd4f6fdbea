"""OpenAI's causal text transformer: BPE tokens in, the EOT token's state projected out."""
from __future__ import annotations

import torch
from torch import nn

from .configs import TextConfig
from .text_transformer import TokenTransformer
from .transformer import Packing, Pooled


class OpenAITextTower(TokenTransformer):
    def __init__(self, config: TextConfig, embed_dim: int):
        super().__init__(config, causal=config.causal)
        self.causal, self.pool, self.eos_id = config.causal, config.pool, config.eos_id
        self.text_projection = nn.Parameter(torch.empty(config.width, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        # OpenAI's order of the random draws (the projection before the blocks), so seeded inits stay the same.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)
        self.transformer.init_weights()

    def _pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N,) the position each row pools: its largest id (OpenAI's EOT), its first `eos_id`, or the last."""
        if self.pool == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        if self.pool == "last":
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device)
        return tokens.argmax(dim=-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (N, L) ids, padded after the pooled token (OpenAI's EOT: the largest id in each row)."""
        if not self.causal or self.pool == "last":
            return self.forward_padded(tokens)
        eot = self._pooled(tokens)
        # The mask is causal, so positions after a row's pooled token never reach it: dropping them is exact.
        # The last block computes the pooled tokens alone, each attending to its own row's tokens.
        shortest, longest = (int(n) for n in torch.aminmax(eot))
        length = longest + 1
        x = self.token_embedding(tokens[:, :length]) + self.positional_embedding[:length]  # N, length, width
        if shortest == longest:  # one caption, or captions of one length: nothing to pack
            x = self.transformer(x, pooled=Pooled(eot))
        else:  # the rest packed, so padding costs attention alone, not the linear layers
            keep = _up_to(eot, length)  # N, length
            packing = Packing(keep)
            # Rows are packed in order, so each row's pooled token is the last of its tokens.
            last = (eot + 1).cumsum(dim=0) - 1
            x = self.transformer(packing.pack(x), packing, Pooled(eot, rows=last, mask=keep[:, None, None]))
        return self.ln_final(x) @ self.text_projection  # x: N, width

    def forward_padded(self, tokens: torch.Tensor) -> torch.Tensor:
        """`forward` without packing: every one of the L given positions runs. Equal to `forward` under the causal
        mask (padding after the pooled token never reaches it) but with no data-dependent shapes, which is what a
        traced export (ONNX) needs; without the mask (MobileCLIP, CLIPA) the padding takes part, so captions come
        padded to the context length as the weights were trained."""
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens per caption; this tower takes at most {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:length]  # N, L, width
        pooled = self._pooled(tokens)
        # The last block computes each row's pooled state alone, its keys the causal mask's (or every position).
        keys = _up_to(pooled, length)[:, None, None] if self.causal else None
        x = self.transformer(x, pooled=Pooled(pooled, mask=keys))  # N, width
        return self.ln_final(x) @ self.text_projection


def _up_to(positions: torch.Tensor, length: int) -> torch.Tensor:
    """(N, length) booleans: each row's positions up to and including its own in `positions`."""
    return torch.arange(length, device=positions.device) <= positions[:, None]
