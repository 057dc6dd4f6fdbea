"""BERT text towers built on `transformers.BertModel` (keys under `transformer.`).

`bert-pooler` is bubbliiiing's self-cn math: pooler output -> ln_final -> text_projection.
`bert-cls` is Chinese-CLIP's: the [CLS] hidden state -> text_projection, with no pooler and no ln_final.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertModel

from .configs import TextConfig
from .text_transformer import set_transformers_checkpointing


def bert_config(config: TextConfig) -> BertConfig:
    return BertConfig(vocab_size=config.vocab_size, hidden_size=config.width, num_hidden_layers=config.layers,
                      num_attention_heads=config.heads, intermediate_size=config.intermediate_size,
                      max_position_embeddings=config.max_position_embeddings,
                      type_vocab_size=config.type_vocab_size, pad_token_id=0,
                      hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout,
                      initializer_range=config.initializer_range)


class BertTextTower(nn.Module):
    pad_token_id = 0

    def __init__(self, config: TextConfig, embed_dim: int):
        super().__init__()
        pooled = config.kind == "bert-pooler"
        self.context_length = config.context_length
        self.transformer = BertModel(bert_config(config), add_pooling_layer=pooled)
        self.ln_final = nn.LayerNorm(config.width) if pooled else nn.Identity()
        self.text_projection = nn.Parameter(torch.empty(config.width, embed_dim))
        self.pooled = pooled
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.text_projection, std=self.transformer.config.hidden_size ** -0.5)

    def set_grad_checkpointing(self, enable: bool) -> None:
        set_transformers_checkpointing(self.transformer, enable)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (N, L) WordPiece ids, [CLS] first, padded with 0."""
        # Padding is masked out of attention and pooling reads position 0, so trimming is exact.
        length = int((tokens != self.pad_token_id).sum(dim=1).max())
        return self.forward_padded(tokens[:, :length])

    def forward_padded(self, tokens: torch.Tensor) -> torch.Tensor:
        """`forward` over all L given positions (padding masked out), with no data-dependent shapes, as a
        traced export (ONNX) needs."""
        mask = tokens != self.pad_token_id
        out = self.transformer(input_ids=tokens, attention_mask=mask.long(), token_type_ids=torch.zeros_like(tokens))
        pooled = out.pooler_output if self.pooled else out.last_hidden_state[:, 0]
        return self.ln_final(pooled) @ self.text_projection
