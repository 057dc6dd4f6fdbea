"""AltCLIP's text tower (transformers' AltCLIPModel, BAAI's multilingual CLIP) on `transformers.XLMRobertaModel`.

XLM-R's last hidden states -> `pre_LN` -> `transformation` (a linear layer with a bias, width -> project_dim) -> the
[CLS] (`<s>`, position 0) state -> `text_projection` onto the embedding. Keys: the XLM-R body under `transformer.`
(XLMRobertaModel's own names), then `pre_LN`, `transformation` and `text_projection` as AltCLIPTextModel names them.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import XLMRobertaConfig, XLMRobertaModel

from .configs import TextConfig
from .text_transformer import set_transformers_checkpointing

# XLM-R's ids: <s> 0, <pad> 1, </s> 2; positions count from pad + 1, as fairseq's do.
PAD_TOKEN_ID = 1


def xlmr_config(config: TextConfig) -> XLMRobertaConfig:
    return XLMRobertaConfig(vocab_size=config.vocab_size, hidden_size=config.width, num_hidden_layers=config.layers,
                            num_attention_heads=config.heads, intermediate_size=config.intermediate_size,
                            max_position_embeddings=config.max_position_embeddings,
                            type_vocab_size=config.type_vocab_size, hidden_act=config.activation,
                            layer_norm_eps=config.eps, pad_token_id=PAD_TOKEN_ID, bos_token_id=0, eos_token_id=2,
                            hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout,
                            initializer_range=config.initializer_range)


class AltCLIPTextTower(nn.Module):
    pad_token_id = PAD_TOKEN_ID

    def __init__(self, config: TextConfig, embed_dim: int):
        super().__init__()
        self.context_length = config.context_length
        self.transformer = XLMRobertaModel(xlmr_config(config), add_pooling_layer=False)
        self.pre_LN = nn.LayerNorm(config.width, eps=config.eps)
        self.transformation = nn.Linear(config.width, config.project_dim)
        self.text_projection = nn.Parameter(torch.empty(config.project_dim, embed_dim))
        nn.init.normal_(self.text_projection, std=config.project_dim ** -0.5)

    def set_grad_checkpointing(self, enable: bool) -> None:
        set_transformers_checkpointing(self.transformer, enable)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (N, L) XLM-R ids, <s> first, padded with <pad> (1)."""
        # Padding is masked out of attention, takes no position, and pooling reads position 0: trimming is exact.
        length = int((tokens != self.pad_token_id).sum(dim=1).max())
        return self.forward_padded(tokens[:, :max(length, 1)])

    def forward_padded(self, tokens: torch.Tensor) -> torch.Tensor:
        """`forward` over all L given positions (padding masked out), with no data-dependent shapes."""
        mask = (tokens != self.pad_token_id).long()
        hidden = self.transformer(input_ids=tokens, attention_mask=mask).last_hidden_state[:, 0]  # N, width
        return self.transformation(self.pre_LN(hidden)) @ self.text_projection
