"""Model-table rows of open_clip's timm-tower families (ConvNeXt, EVA) as plain dicts, `CLIPConfig.to_dict`'s form:
timm's trunk under open_clip's head and OpenAI's causal text tower, with open_clip 3.3's model_configs JSON sizes.

Plain data, importing nothing: nets/configs.py turns every row into its dataclasses (which check it) when it merges
them into MODEL_CONFIGS, and the table module cannot be imported from here without a loop."""
from __future__ import annotations

# timm's ConvNeXts as open_clip's JSONs name them: trunk -> (features, total depth); stride 32 is the grid's patch.
_CONVNEXT_TRUNKS = {"convnext_tiny": (768, 18), "convnext_small": (768, 36), "convnext_base": (1024, 36),
                    "convnext_large": (1536, 36), "convnext_xlarge": (2048, 36), "convnext_xxlarge": (3072, 40)}


def _text(width: int, heads: int, layers: int, kind: str = "openai") -> dict:
    # Every family here trained with exact GELU (no quick_gelu in their JSONs).
    return dict(kind=kind, context_length=77, vocab_size=49408, width=width, layers=layers, heads=heads,
                activation="gelu")


def _convnext(trunk: str, image_size: int, embed_dim: int, text: tuple[int, int, int], proj: str = "linear") -> dict:
    """open_clip's `convnext_*` JSON: timm's trunk at its defaults, pooled by its own head (average, LayerNorm;
    timm_pool ""), then `proj` (a linear layer, or the `_d` models' MLP) onto embed_dim."""
    width, layers = _CONVNEXT_TRUNKS[trunk]
    vision = dict(kind="timm", timm_model_name=trunk, image_size=image_size, patch_size=32, width=width, layers=layers,
                  heads=0, activation="gelu", timm_pool="", timm_proj=proj, timm_kwargs=())
    return dict(embed_dim=embed_dim, vision=vision, text=_text(*text))


# open_clip 3.3's ConvNeXt configs (model_configs/convnext_*.json), in its list_models() order.
CONVNEXT: dict[str, dict] = {
    "convnext_base": _convnext("convnext_base", 224, 512, (512, 8, 12)),
    "convnext_base_w": _convnext("convnext_base", 256, 640, (640, 10, 12)),
    "convnext_base_w_320": _convnext("convnext_base", 320, 640, (640, 10, 12)),
    "convnext_large": _convnext("convnext_large", 224, 768, (768, 12, 12)),
    "convnext_large_d": _convnext("convnext_large", 256, 768, (768, 12, 16), proj="mlp"),
    "convnext_large_d_320": _convnext("convnext_large", 320, 768, (768, 12, 16), proj="mlp"),
    "convnext_small": _convnext("convnext_small", 224, 512, (512, 8, 12)),
    "convnext_tiny": _convnext("convnext_tiny", 224, 1024, (512, 8, 12)),
    "convnext_xlarge": _convnext("convnext_xlarge", 256, 1024, (1024, 16, 20)),
    "convnext_xxlarge": _convnext("convnext_xxlarge", 256, 1024, (1024, 16, 24)),
    "convnext_xxlarge_320": _convnext("convnext_xxlarge", 320, 1024, (1024, 16, 24)),
}

# timm's EVA ViTs as open_clip's JSONs name them: trunk -> (patch, width, layers, heads).
_EVA_TRUNKS = {"eva_giant_patch14_224": (14, 1408, 40, 16), "eva02_base_patch16_clip_224": (16, 768, 12, 12),
               "eva02_large_patch14_clip_224": (14, 1024, 24, 16), "eva02_large_patch14_clip_336": (14, 1024, 24, 16),
               "eva02_enormous_patch14_clip_224": (14, 1792, 64, 16)}


def _eva(trunk: str, image_size: int, embed_dim: int, text: tuple[int, int, int]) -> dict:
    """open_clip's `EVA*` JSON: timm's trunk at its defaults, its class token (timm_pool "token") projected by timm's
    own classifier (timm_proj null: `trunk.head`, with a bias); the text tower's keys under `text.` (custom_text)."""
    patch, width, layers, heads = _EVA_TRUNKS[trunk]
    vision = dict(kind="timm", timm_model_name=trunk, image_size=image_size, patch_size=patch, width=width,
                  layers=layers, heads=heads, activation="gelu", timm_pool="token", timm_proj="", timm_kwargs=())
    return dict(embed_dim=embed_dim, vision=vision, text=_text(*text, kind="openai-custom"))


# open_clip 3.3's EVA configs (model_configs/EVA*.json), in its list_models() order.
EVA: dict[str, dict] = {
    "EVA01-g-14": _eva("eva_giant_patch14_224", 224, 1024, (768, 12, 12)),
    "EVA01-g-14-plus": _eva("eva_giant_patch14_224", 224, 1024, (1024, 16, 24)),
    "EVA02-B-16": _eva("eva02_base_patch16_clip_224", 224, 512, (512, 8, 12)),
    "EVA02-E-14": _eva("eva02_enormous_patch14_clip_224", 224, 1024, (1024, 16, 24)),
    "EVA02-E-14-plus": _eva("eva02_enormous_patch14_clip_224", 224, 1024, (1280, 20, 32)),
    "EVA02-L-14": _eva("eva02_large_patch14_clip_224", 224, 768, (768, 12, 12)),
    "EVA02-L-14-336": _eva("eva02_large_patch14_clip_336", 336, 768, (768, 12, 12)),
}

# Every row of this module, merged into nets/configs.py's MODEL_CONFIGS.
ZOO: dict[str, dict] = {**CONVNEXT, **EVA}
