"""Model-table rows of open_clip's timm-tower families (ConvNeXt, EVA, ViTamin, PE-Core, MobileCLIP) as plain dicts,
`CLIPConfig.to_dict`'s form: timm's trunk under open_clip's head and OpenAI's text tower (causal but for MobileCLIP's
FastViTs and L-14), with open_clip 3.3's model_configs JSON sizes.

Plain data, importing nothing: nets/configs.py turns every row into its dataclasses (which check it) when it merges
them into MODEL_CONFIGS, and the table module cannot be imported from here without a loop."""
from __future__ import annotations

# timm's ConvNeXts as open_clip's JSONs name them: trunk -> (features, total depth); stride 32 is the grid's patch.
_CONVNEXT_TRUNKS = {"convnext_tiny": (768, 18), "convnext_small": (768, 36), "convnext_base": (1024, 36),
                    "convnext_large": (1536, 36), "convnext_xlarge": (2048, 36), "convnext_xxlarge": (3072, 40)}


def _text(width: int, heads: int, layers: int, kind: str = "openai", context_length: int = 77,
          causal: bool = True) -> dict:
    # Every family here trained with exact GELU (no quick_gelu in their JSONs).
    return dict(kind=kind, context_length=context_length, vocab_size=49408, width=width, layers=layers, heads=heads,
                activation="gelu", causal=causal)


def _vit_trunk(trunk: str, image_size: int, embed_dim: int, text: tuple[int, int, int], sizes: tuple[int, ...],
               pool: str, proj: str, context_length: int = 77, causal: bool = True) -> dict:
    """A timm ViT-like trunk at its defaults under open_clip's head (pool, proj), sizes (grid stride, width, layers,
    heads) for the record, and OpenAI's text tower with open_clip's custom_text keys under `text.`."""
    patch, width, layers, heads = sizes
    vision = dict(kind="timm", timm_model_name=trunk, image_size=image_size, patch_size=patch, width=width,
                  layers=layers, heads=heads, activation="gelu", timm_pool=pool, timm_proj=proj, timm_kwargs=())
    return dict(embed_dim=embed_dim, vision=vision,
                text=_text(*text, kind="openai-custom", context_length=context_length, causal=causal))


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

# timm's ViTamins (a MBConv stem, then ViT blocks): grid stride, width, layers, heads.
_VITAMIN_SIZES = {"small": (16, 384, 14, 6), "base": (16, 768, 14, 12), "large": (16, 1024, 31, 16),
                  "large2": (16, 1024, 31, 16), "xlarge": (16, 1152, 32, 16)}


def _vitamin(size: str, trunk_px: int, image_size: int, embed_dim: int, text: tuple[int, int, int]) -> dict:
    """open_clip's `ViTamin-*` JSON: timm's `vitamin_{size}_{px}`, its own pooling (timm_pool ""), a linear head."""
    return _vit_trunk(f"vitamin_{size}_{trunk_px}", image_size, embed_dim, text, _VITAMIN_SIZES[size], "", "linear")


# open_clip 3.3's ViTamin configs. ViTamin-XL-384's JSON says image_size 256 for its 384 px trunk: kept as it is.
VITAMIN: dict[str, dict] = {
    "ViTamin-B": _vitamin("base", 224, 224, 512, (512, 8, 12)),
    "ViTamin-B-LTT": _vitamin("base", 224, 224, 768, (768, 12, 12)),
    "ViTamin-L": _vitamin("large", 224, 224, 768, (768, 12, 12)),
    "ViTamin-L-256": _vitamin("large", 256, 256, 768, (768, 12, 12)),
    "ViTamin-L-336": _vitamin("large", 336, 336, 768, (768, 12, 12)),
    "ViTamin-L-384": _vitamin("large", 384, 384, 768, (768, 12, 12)),
    "ViTamin-L2": _vitamin("large2", 224, 224, 1024, (1024, 16, 24)),
    "ViTamin-L2-256": _vitamin("large2", 256, 256, 1024, (1024, 16, 24)),
    "ViTamin-L2-336": _vitamin("large2", 336, 336, 1024, (1024, 16, 24)),
    "ViTamin-L2-384": _vitamin("large2", 384, 384, 1024, (1024, 16, 24)),
    "ViTamin-S": _vitamin("small", 224, 224, 384, (384, 6, 12)),
    "ViTamin-S-LTT": _vitamin("small", 224, 224, 768, (768, 12, 12)),
    "ViTamin-XL-256": _vitamin("xlarge", 256, 256, 1152, (1152, 16, 27)),
    "ViTamin-XL-336": _vitamin("xlarge", 336, 336, 1152, (1152, 16, 27)),
    "ViTamin-XL-384": _vitamin("xlarge", 384, 256, 1152, (1152, 16, 27)),
}


def _pe_core(trunk: str, image_size: int, embed_dim: int, text: tuple[int, int, int], sizes: tuple[int, ...],
             context_length: int = 32) -> dict:
    """open_clip's `PE-Core-*` JSON: timm's `vit_pe_core_*` (RoPE), its attention pool (timm_pool "map") projected by
    timm's own head (timm_proj null); a causal text tower on 32-token captions (72 for bigG)."""
    return _vit_trunk(trunk, image_size, embed_dim, text, sizes, "map", "", context_length)


# open_clip 3.3's PE-Core configs.
PE_CORE: dict[str, dict] = {
    "PE-Core-B-16": _pe_core("vit_pe_core_base_patch16_224", 224, 1024, (1024, 16, 24), (16, 768, 12, 12)),
    "PE-Core-L-14-336": _pe_core("vit_pe_core_large_patch14_336", 336, 1024, (1024, 16, 24), (14, 1024, 24, 16)),
    "PE-Core-S-16-384": _pe_core("vit_pe_core_small_patch16_384", 384, 512, (512, 8, 12), (16, 384, 12, 6)),
    "PE-Core-T-16-384": _pe_core("vit_pe_core_tiny_patch16_384", 384, 512, (512, 8, 12), (16, 192, 12, 3)),
    "PE-Core-bigG-14-448": _pe_core("vit_pe_core_gigantic_patch14_448", 448, 1280, (1280, 20, 24),
                                    (14, 1536, 50, 16), context_length=72),
}

# open_clip 3.3's MobileCLIP configs. The ViT-B ones: timm's `vit_base_mci_224` (a convolutional stem), its class
# token projected by timm's head, a causal text tower.
MOBILECLIP: dict[str, dict] = {
    name: _vit_trunk("vit_base_mci_224", 224, 512, (512, 8, 12), (16, 768, 12, 12), "token", "")
    for name in ("MobileCLIP-B", "MobileCLIP2-B")
}

# timm's FastViT MCi trunks (RepMixer stages, attention in the last ones, BatchNorm throughout): features after
# timm's final 1 x 1 conv, blocks over every stage, and the grid's stride (MCi3/4 have a fifth stage).
_FASTVIT_TRUNKS = {"fastvit_mci0": (1024, 20, 32), "fastvit_mci1": (1024, 40, 32), "fastvit_mci2": (1280, 44, 32),
                   "fastvit_mci3": (3072, 44, 64), "fastvit_mci4": (4096, 46, 64)}


def _fastvit(trunk: str, embed_dim: int, text: tuple[int, int, int]) -> dict:
    """open_clip's FastViT `MobileCLIP*-S*` JSON: timm's trunk at 256 px, average-pooled and projected by timm's own
    classifier (timm_proj null), and a text tower without the causal mask that still pools the EOT token."""
    width, layers, stride = _FASTVIT_TRUNKS[trunk]
    vision = dict(kind="timm", timm_model_name=trunk, image_size=256, patch_size=stride, width=width, layers=layers,
                  heads=0, activation="gelu", timm_pool="avg", timm_proj="", timm_kwargs=())
    return dict(embed_dim=embed_dim, vision=vision, text=_text(*text, kind="openai-custom", causal=False))


# open_clip 3.3's MobileCLIP configs with a text tower without the causal mask (still pooling the EOT token).
MOBILECLIP_NON_CAUSAL: dict[str, dict] = {
    "MobileCLIP-S1": _fastvit("fastvit_mci1", 512, (512, 8, 12)),
    "MobileCLIP-S2": _fastvit("fastvit_mci2", 512, (512, 8, 12)),
    "MobileCLIP2-S0": _fastvit("fastvit_mci0", 512, (512, 8, 12)),
    "MobileCLIP2-S2": _fastvit("fastvit_mci2", 512, (512, 8, 12)),
    "MobileCLIP2-S3": _fastvit("fastvit_mci3", 768, (768, 12, 12)),
    "MobileCLIP2-S4": _fastvit("fastvit_mci4", 768, (768, 12, 12)),
    # timm's CLIP ViT-L/14, its class token projected by timm's head; the text tower without the causal mask.
    "MobileCLIP2-L-14": _vit_trunk("vit_large_patch14_clip_224", 224, 768, (768, 12, 12), (14, 1024, 24, 16),
                                   "token", "", causal=False),
}

# Every row of this module, merged into nets/configs.py's MODEL_CONFIGS.
ZOO: dict[str, dict] = {**CONVNEXT, **EVA, **VITAMIN, **PE_CORE, **MOBILECLIP, **MOBILECLIP_NON_CAUSAL}
