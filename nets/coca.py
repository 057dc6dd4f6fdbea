"""CoCa's towers as open_clip builds them (its coca_model.py and transformer.py), under open_clip's keys: the image
tower's attentional pooler (`visual.attn_pool.*`), the text tower's class embedding (`text.cls_emb`) and the caption
decoder (`text_decoder.*`). nets/clip.py joins them; utils/predict/generate.py writes captions with them."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .configs import DecoderConfig, TextConfig, VisionConfig
from .text_transformer import TokenTransformer
from .transformer import _ACTIVATIONS, ResidualAttentionBlock, Transformer
from .vit import VisionTransformer

PAD_ID = 0  # open_clip's CoCa pad_id: the tokenizer's padding, masked out of the text tower's attention


class AttentionalPooler(nn.Module):
    """`queries` learned queries of `width` attend to the image tokens (`context` wide): open_clip's
    AttentionalPooler, whose nn.MultiheadAttention holds separate q/k/v weights when the widths differ."""

    def __init__(self, width: int, context: int, heads: int, queries: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, width))
        self.attn = nn.MultiheadAttention(width, heads, kdim=context, vdim=context, batch_first=True)
        self.ln_q = nn.LayerNorm(width)
        self.ln_k = nn.LayerNorm(context)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)  # N, queries, width
        return self.attn(q, x, x, need_weights=False)[0]


class CoCaVisionTransformer(VisionTransformer):
    """OpenAI's ViT whose tokens the pooler reads: the first pooled query, LayerNormed and projected, is the
    contrastive feature; the other queries, LayerNormed, are the decoder's image tokens (open_clip's 'original
    CoCa setup')."""

    def __init__(self, config: VisionConfig, embed_dim: int):
        super().__init__(config, embed_dim)
        self.attn_pool = AttentionalPooler(embed_dim, config.width, config.attn_pool_heads, config.attn_pool_queries)
        self.ln_post = nn.LayerNorm(embed_dim)
        self.proj = nn.Parameter(torch.empty(embed_dim, embed_dim))
        nn.init.normal_(self.proj, std=config.width ** -0.5)

    def forward_with_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, embed_dim) features and (N, queries - 1, embed_dim) image tokens for the decoder."""
        x = self.conv1(pixels.to(self.conv1.weight.dtype))  # N, width, grid, grid
        x = x.flatten(2).transpose(1, 2)  # N, grid*grid, width
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_post(self.attn_pool(self.transformer(self.ln_pre(x))))  # N, queries, embed_dim
        return x[:, 0] @ self.proj, x[:, 1:]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_with_tokens(pixels)[0]


def _masked_block(block: ResidualAttentionBlock, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`block` (our pre-LayerNorm block, OpenAI's keys) with a boolean attention mask (N, 1, L, L; True attends). The
    attention is called, not read, so that a LoRA adapter wrapped around it (utils/finetune/lora.py) takes part."""
    x = x + block.attn(block.ln_1(x), False, None, mask=mask)
    return x + block.mlp(block.ln_2(x))


class CoCaTextTower(TokenTransformer):
    """OpenAI's causal text transformer with a class embedding appended after the caption: its state, LayerNormed
    and projected, is the text feature; the caption's states (no LayerNorm) feed the decoder. Keys under `text.`."""

    def __init__(self, config: TextConfig, embed_dim: int):
        super().__init__(config, causal=True)
        # One position more than the caption's context: the class embedding's.
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length + 1, config.width))
        self.cls_emb = nn.Parameter(torch.empty(config.width))
        self.text_projection = nn.Parameter(torch.empty(config.width, embed_dim))
        self.init_body()
        nn.init.normal_(self.cls_emb, std=0.01)
        nn.init.normal_(self.text_projection, std=config.width ** -0.5)

    def forward_with_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (N, L) as given (open_clip's generate feeds them unpadded) -> (N, embed_dim) features and the
        (N, L, width) caption states the decoder reads."""
        n, length = tokens.shape
        x = torch.cat([self.token_embedding(tokens), self.cls_emb.to(self.token_embedding.weight.dtype)
                       .expand(n, 1, -1)], dim=1) + self.positional_embedding[:length + 1]  # N, L + 1, width
        # open_clip's mask for the published weights: causal, and key j > 0 hidden where token j - 1 is padding
        # (its "legacy" CoCa mask puts the class position first when it lines the padding up with the keys).
        keys = torch.cat([tokens.new_ones(n, 1, dtype=torch.bool), tokens != PAD_ID], dim=1)  # N, L + 1
        causal = torch.ones(length + 1, length + 1, dtype=torch.bool, device=tokens.device).tril()
        mask = (causal & keys[:, None, :])[:, None]  # N, 1, L + 1, L + 1
        for block in self.transformer.resblocks:
            x = _masked_block(block, x, mask)
        return self.ln_final(x[:, -1]) @ self.text_projection, x[:, :-1]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Features of captions padded to the context (as open_clip's tokenizer pads them: the class embedding sits
        after the padding, so its position is the context length whatever the caller trimmed)."""
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"{tokens.shape[1]} tokens per caption; this tower takes at most {self.context_length}")
        tokens = F.pad(tokens, (0, self.context_length - tokens.shape[1]), value=PAD_ID)
        return self.forward_with_tokens(tokens)[0]

    def forward_padded(self, tokens: torch.Tensor) -> torch.Tensor:
        """`forward` of captions already at the full context, with no data-dependent shapes (a traced export)."""
        return self.forward_with_tokens(tokens)[0]


class CrossAttentionBlock(nn.Module):
    """open_clip's ResidualAttentionBlock with is_cross_attention: the text states attend to the image tokens."""

    def __init__(self, width: int, heads: int, mlp_width: int, activation: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1_kv = nn.LayerNorm(width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, mlp_width)),
                                              ("gelu", _ACTIVATIONS[activation]()),
                                              ("c_proj", nn.Linear(mlp_width, width))]))

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        kv = self.ln_1_kv(image)
        x = x + self.attn(self.ln_1(x), kv, kv, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class MultimodalDecoder(nn.Module):
    """open_clip's MultimodalTransformer: per layer a causal self-attention block over the caption states, then a
    cross-attention block to the image tokens; logits over the vocabulary at every position."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.context_length = config.context_length
        blocks = Transformer(config.width, config.layers, config.heads, causal=True, mlp_width=config.mlp_width,
                             activation=config.activation)
        blocks.init_weights()
        self.resblocks = blocks.resblocks
        self.cross_attn = nn.ModuleList([CrossAttentionBlock(config.width, config.heads, config.mlp_width,
                                                             config.activation) for _ in range(config.layers)])
        self.ln_final = nn.LayerNorm(config.width)
        self.text_projection = nn.Parameter(torch.empty(config.width, config.vocab_size))
        nn.init.normal_(self.text_projection, std=config.width ** -0.5)

    def forward(self, image_tokens: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        """(N, queries - 1, width) image tokens, (N, L, width) caption states -> (N, L, vocab) logits."""
        if text_states.shape[1] > self.context_length:
            raise ValueError(f"{text_states.shape[1]} tokens; the decoder takes at most {self.context_length}")
        x = text_states
        for block, cross in zip(self.resblocks, self.cross_attn):
            x = cross(block(x, causal=True), image_tokens)
        return self.ln_final(x) @ self.text_projection
