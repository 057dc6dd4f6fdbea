"""open_clip's CLIP built with the sizes of a model in this repo's table, for the side-by-side benchmarks."""
from __future__ import annotations

from torch import nn


def open_clip_model(config) -> nn.Module:
    """Random weights; our state dicts load into it as they are (OpenAI's key names on both sides)."""
    import open_clip

    v, t = config.vision, config.text
    # open_clip builds a ModifiedResNet when layers is a list; its attention pool is width * 32 wide.
    vision = dict(image_size=v.image_size, patch_size=v.patch_size, width=v.width, layers=v.layers,
                  head_width=v.width // v.heads) if v.kind == "vit" else \
        dict(image_size=v.image_size, width=v.width, layers=list(v.layers), head_width=v.width * 32 // v.heads)
    return open_clip.model.CLIP(
        embed_dim=config.embed_dim,
        vision_cfg=vision,
        text_cfg=dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                      layers=t.layers),
        quick_gelu=t.activation == "quick_gelu")  # open_clip's one switch for both towers
