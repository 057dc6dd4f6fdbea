"""open_clip's HFTextEncoder: a transformers text model (RoBERTa, XLM-R, NLLB-200's M2M100 encoder) built from a
config made here from the row's sizes (no hub), pooled and projected as open_clip does, with its keys
(`transformer.*`, `proj.*` under `text.`), so open_clip's files load unchanged."""
from __future__ import annotations

import torch
from torch import nn

from .configs import TextConfig
from .text_transformer import set_transformers_checkpointing


def transformers_config(config: TextConfig):
    """The transformers config of the row's model: what its hub config.json says that shapes the network, and
    the row's dropout for training."""
    from transformers import M2M100Config, RobertaConfig, XLMRobertaConfig

    if config.hf_family == "m2m_100":
        return M2M100Config(vocab_size=config.vocab_size, d_model=config.width, encoder_layers=config.layers,
                            encoder_attention_heads=config.heads, encoder_ffn_dim=config.intermediate_size,
                            max_position_embeddings=config.max_position_embeddings, pad_token_id=config.pad_id,
                            activation_function=config.activation, scale_embedding=True, dropout=config.dropout,
                            attention_dropout=config.dropout, activation_dropout=0.0, encoder_layerdrop=0.0,
                            init_std=config.initializer_range)
    cls = RobertaConfig if config.hf_family == "roberta" else XLMRobertaConfig
    return cls(vocab_size=config.vocab_size, hidden_size=config.width, num_hidden_layers=config.layers,
               num_attention_heads=config.heads, intermediate_size=config.intermediate_size,
               max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
               pad_token_id=config.pad_id, hidden_act=config.activation, layer_norm_eps=config.eps,
               hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout,
               initializer_range=config.initializer_range)


def _transformer(config: TextConfig, hf_config) -> nn.Module:
    from transformers import RobertaModel, XLMRobertaModel
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100Encoder

    if config.hf_family == "m2m_100":
        # open_clip keeps AutoModel's encoder of the encoder-decoder: built alone, the decoder never allocated.
        return M2M100Encoder(hf_config)
    cls = RobertaModel if config.hf_family == "roberta" else XLMRobertaModel
    # open_clip adds the model's pooler only for cls_pooler, whose output it then is.
    return cls(hf_config, add_pooling_layer=config.hf_pooler == "cls_pooler")


class HFTextTower(nn.Module):
    """`transformer` (transformers' model), open_clip's pooler over the positions whose id is not `pad_id`, then
    `proj`: a Linear, an MLP (Linear, GELU, Linear; no biases, the hidden width halfway) or none."""

    def __init__(self, config: TextConfig, embed_dim: int):
        super().__init__()
        self.context_length = config.context_length
        self.pad_id = config.pad_id
        self.pooler = config.hf_pooler
        self.transformer = _transformer(config, transformers_config(config))
        width = config.width
        if config.hf_proj == "linear":
            self.proj = nn.Linear(width, embed_dim, bias=False)
        elif config.hf_proj == "mlp":
            hidden = (width + embed_dim) // 2
            self.proj = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(),
                                      nn.Linear(hidden, embed_dim, bias=False))
        elif width == embed_dim:
            self.proj = nn.Identity()
        else:
            raise ValueError(f"an hf text tower without projection gives width {width} features, not {embed_dim}")

    def groups(self) -> list:
        """Input side first, as utils/finetune/partial.py locks them: the embeddings, one group per layer (the last
        with the final norm and the pooler), the projection."""
        t = self.transformer
        if hasattr(t, "embeddings"):  # RoBERTa, XLM-R
            layers, first, last = list(t.encoder.layer), [t.embeddings], [t.pooler] if t.pooler is not None else []
        else:  # M2M100's encoder: sinusoidal positions (no parameters), a LayerNorm after the layers
            layers, first, last = list(t.layers), [t.embed_tokens], [t.layer_norm]
        return [first, *([layer] for layer in layers[:-1]), [layers[-1], *last], [self.proj]]

    def set_grad_checkpointing(self, enable: bool) -> None:
        set_transformers_checkpointing(self.transformer, enable)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (N, L) ids, padded on the right with `pad_id` (open_clip's HFTokenizer pads to the context)."""
        # Padding is masked out of attention and pooling, and positions count from the start (RoBERTa's skip the
        # padding), so trailing columns of padding alone can go: exact, and far less work on short captions.
        kept = (tokens != self.pad_id).any(dim=0).nonzero()
        length = int(kept[-1]) + 1 if len(kept) else 1
        return self.forward_padded(tokens[:, :length])

    def forward_padded(self, tokens: torch.Tensor) -> torch.Tensor:
        """`forward` over all L given positions, with no data-dependent shapes."""
        mask = (tokens != self.pad_id).long()
        out = self.transformer(input_ids=tokens, attention_mask=mask)
        hidden = out.last_hidden_state  # N, L, width
        if self.pooler == "mean_pooler":
            pooled = (hidden * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(-1, keepdim=True)
        elif self.pooler == "cls_pooler" and getattr(out, "pooler_output", None) is not None:
            pooled = out.pooler_output
        else:  # the first position: NLLB's language code, RoBERTa's <s>
            pooled = hidden[:, 0]
        return self.proj(pooled)  # N, embed_dim
