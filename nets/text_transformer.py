"""The body both transformer text towers share: token and position embeddings, the blocks, the final LayerNorm."""
from __future__ import annotations

import torch
from torch import nn

from .configs import TextConfig
from .transformer import Transformer


class TokenTransformer(nn.Module):
    """Keys as OpenAI's (and open_clip's `text.*`): `token_embedding`, `positional_embedding`,
    `transformer.resblocks.N.*`, `ln_final`. A tower adds its pooling and `text_projection` after them."""

    def __init__(self, config: TextConfig, causal: bool, eps: float = 1e-5):
        super().__init__()
        self.context_length = config.context_length
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.transformer = Transformer(config.width, config.layers, config.heads, causal=causal,
                                       mlp_width=config.mlp_width, activation=config.activation, eps=eps)
        self.ln_final = nn.LayerNorm(config.width, eps=eps)

    def init_body(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_weights()

    def set_grad_checkpointing(self, enable: bool) -> None:
        self.transformer.grad_checkpointing = enable


def set_transformers_checkpointing(model, enable: bool) -> None:
    """Gradient checkpointing of a transformers model (the BERT, XLM-R and HF text towers' `transformer`)."""
    if enable:
        model.activation_checkpointing_enable()
    else:
        model.activation_checkpointing_disable()
