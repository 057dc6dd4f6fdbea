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
from .transformer import _ACTIVATIONS, Attention, ResidualAttentionBlock, Transformer, sdpa, split_heads
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

    def step(self, tokens: torch.Tensor, position: int, past: list, keys: torch.Tensor) -> torch.Tensor:
        """The caption state (N, 1, width) of one new token per row (N, 1) at `position`, from each block's keys and
        values of the positions before it (`past`, updated in place); `keys` (N, position + 1): which of them it may
        attend, as `forward_with_tokens`'s mask has them. Causal, so no later token changes it."""
        if position >= self.context_length:
            raise ValueError(f"position {position}; this tower takes at most {self.context_length} tokens")
        x = self.token_embedding(tokens) + self.positional_embedding[position]
        for i, block in enumerate(self.transformer.resblocks):
            x, past[i] = block.step(x, past[i], keys[:, None, None])
        return x

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

    def image_keys(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of the image tokens (N, S, width), each (N, heads, S, head width): what `forward`
        computes again for every caption, made once for a whole decoding."""
        width, heads = self.attn.embed_dim, self.attn.num_heads
        kv = F.linear(self.ln_1_kv(image), self.attn.in_proj_weight[width:], self.attn.in_proj_bias[width:])
        return tuple(split_heads(kv, 2, heads))

    def step(self, x: torch.Tensor, image_keys: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """`forward` of one new position per row (R, 1, width) against `image_keys` of n images, R = n x beams rows
        in image order: each image's beams are that many queries to its keys, so the keys are not repeated."""
        width, heads = self.attn.embed_dim, self.attn.num_heads
        rows, n = x.shape[0], image_keys[0].shape[0]
        q = F.linear(self.ln_1(x), self.attn.in_proj_weight[:width], self.attn.in_proj_bias[:width])
        q = q.view(n, rows // n, heads, width // heads).transpose(1, 2)  # n, H, beams, hd
        out = sdpa(q, *image_keys).transpose(1, 2).reshape(rows, 1, width)
        x = x + self.attn.out_proj(out)
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

    # x @ text_projection, the largest matmul of a decoding step (512 x 49,408 for ViT-B-32's); nets/fast.py swaps in
    # oneDNN's for CPU inference.
    vocabulary = staticmethod(torch.matmul)

    def forward(self, image_tokens: torch.Tensor, text_states: torch.Tensor, last: bool = False) -> torch.Tensor:
        """(N, queries - 1, width) image tokens, (N, L, width) caption states -> (N, L, vocab) logits; `last`: the
        last position's alone, (N, vocab), without projecting the others onto the vocabulary."""
        if text_states.shape[1] > self.context_length:
            raise ValueError(f"{text_states.shape[1]} tokens; the decoder takes at most {self.context_length}")
        x = text_states
        for block, cross in zip(self.resblocks, self.cross_attn):
            x = cross(block(x, causal=True), image_tokens)
        return self.vocabulary(self.ln_final(x[:, -1] if last else x), self.text_projection)

    def step(self, image_keys: list, state: torch.Tensor, past: list) -> torch.Tensor:
        """(N, vocab) logits of one new caption state per row (N, 1, width), from each self-attention block's keys
        and values of the positions before it (`past`, updated in place) and each cross block's `image_keys`."""
        x = state
        for i, (block, cross) in enumerate(zip(self.resblocks, self.cross_attn)):
            x, past[i] = block.step(x, past[i])
            x = cross.step(x, image_keys[i])
        return self.vocabulary(self.ln_final(x), self.text_projection)[:, 0]


class CaptionSteps:
    """A CoCa's next-token logits one token at a time, each layer's keys and values kept (a key-value cache): after
    tokens t_0 .. t_p were fed, `next` gives `caption_logits(image_tokens, t_0 .. t_p)[:, -1]` at the cost of one
    position instead of the whole prefix, and the image tokens' keys and values are made once per image, not at every
    token for every beam. Rows are `beams` per image, image by image; `keep(rows)` follows a beam search moving
    rows among each image's beams."""

    def __init__(self, net: nn.Module, image_tokens: torch.Tensor, beams: int = 1):
        self.text, self.decoder, self.beams = net.text, net.text_decoder, beams
        self.image_keys = [cross.image_keys(image_tokens) for cross in self.decoder.cross_attn]
        self.text_past = [None] * len(self.text.transformer.resblocks)
        self.decoder_past = [None] * len(self.decoder.resblocks)
        self.keys, self.last, self.position = None, None, 0

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (R, 1): each row's next token -> (R, vocab) logits for the token after it."""
        # forward_with_tokens' mask: key 0 always, key j > 0 where token j - 1 is not padding.
        fresh = tokens.new_ones(tokens.shape[0], 1, dtype=torch.bool) if self.last is None else self.last != PAD_ID
        self.keys = fresh if self.keys is None else torch.cat([self.keys, fresh], dim=1)
        state = self.text.step(tokens, self.position, self.text_past, self.keys)
        self.last, self.position = tokens, self.position + 1
        return self.decoder.step(self.image_keys, state, self.decoder_past)

    def keep(self, rows: torch.Tensor) -> None:
        """Row i becomes row `rows[i]` of before, with all it has seen; each must come from its own image's beams."""
        if not torch.equal(rows // self.beams, torch.arange(len(rows), device=rows.device) // self.beams):
            raise ValueError("keep: a row may only take the place of a row of the same image")
        self.keys, self.last = self.keys[rows], self.last[rows]
        for past in (self.text_past, self.decoder_past):
            past[:] = [(k[rows], v[rows]) for k, v in past]

    @staticmethod
    def fits(net: nn.Module) -> bool:
        """Whether `net`'s decoder is made of the plain blocks whose `step` this follows (not adapter-wrapped ones,
        whose forward may compute something else)."""
        blocks = [*net.text.transformer.resblocks, *net.text_decoder.resblocks]
        return (type(net.text) is CoCaTextTower and type(net.text_decoder) is MultimodalDecoder
                and all(type(b) is ResidualAttentionBlock and type(b.attn) is Attention for b in blocks)
                and all(type(c) is CrossAttentionBlock and type(c.attn) is nn.MultiheadAttention
                        for c in net.text_decoder.cross_attn))
