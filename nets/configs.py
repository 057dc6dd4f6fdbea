"""Model table: every `phi` is one row of data, turned into dataclasses here (open_clip's own configs are read by
nets/open_clip_configs.py, a bare state dict's shapes by nets/shape_config.py).

The rows are one encoding, CLIPConfig dataclasses written by keyword in one Python table, rather than open_clip's
JSON file per model: 69 of the 72 phis use OpenAI's text tower at its context and vocabulary, and most are the
GELU or QuickGELU twin of another, which a table says once (`_openai_text`, `_activation_twins`) where JSON files
repeat it; the dataclasses check every row when the module loads; the whole table reads in one sitting. Its values
are plain dicts (`CLIPConfig.to_dict`), the form a weight file's architecture record holds, so the table is JSON-able
data. A tower kind (`VisionConfig.kind`, `TextConfig.kind`) names its builder in nets/clip.py's `IMAGE_TOWERS` /
`TEXT_TOWERS`: a new kind is a name below, a builder there and rows that use it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Mapping

from utils.errors import UserError

from .hf_rows import HF_POOLERS, HF_PROJS, HF_ROWS
from .zoo_rows import ZOO

# Text tower kinds:
#   openai       causal BPE transformer, EOT pooling, ln_final, text_projection (OpenAI CLIP)
#   bert-pooler  BertModel pooler output -> ln_final -> text_projection (bubbliiiing's self-cn)
#   bert-cls     BertModel [CLS] hidden state -> text_projection (Chinese-CLIP)
#   siglip       bidirectional transformer over captions padded to the context, the last position -> a linear
#                projection with `proj_bias` (or none: `projection=False`); keys under open_clip's `text.` (SigLIP)
#   openai-custom  the openai tower as open_clip's `custom_text` models hold it: keys under `text.` (EVA)
#   hf       open_clip's HFTextEncoder: transformers' `hf_family` model (RoBERTa, XLM-R, NLLB's M2M100 encoder) under
#            `text.transformer.`, pooled (`hf_pooler`) over the ids that are not `pad_id`, then `text.proj` (`hf_proj`)
#   coca     CoCa's: the openai tower with a class embedding appended after the caption (`text.cls_emb`), pooled there
#            (nets/coca.py); keys under `text.`
#   altclip      transformers' AltCLIP: XLMRobertaModel -> pre_LN -> transformation (width -> project_dim) -> the
#                [CLS] state -> text_projection (BAAI's multilingual AltCLIP folders)
TEXT_KINDS = ("openai", "bert-pooler", "bert-cls", "siglip", "openai-custom", "hf", "coca", "altclip")
# The transformers model types the hf kind builds (nets/text_hf.py).
HF_FAMILIES = ("roberta", "xlm-roberta", "m2m_100")
TEXT_POOLS = ("argmax", "last", "eos")
# Image tower kinds:
#   vit      OpenAI's Vision Transformer: `layers` blocks of `width`, `patch_size` patches
#   resnet   OpenAI's ModifiedResNet: `layers` = blocks in each of its 4 stages, `width` = the stem's
#            channels, `heads` = the attention pool's; patch_size is 32, the stride of the grid it pools
#   timm     timm's `timm_model_name` (SigLIP's `vit_*_siglip_*`) at this row's sizes, its pooled features the
#            embedding (no projection: width == embed_dim); `activation` "gelu" is timm's own (open_clip's rows),
#            "gelu_tanh" transformers' SiglipModel's; keys under open_clip's `visual.trunk.`
#   coca-vit CoCa's: OpenAI's ViT whose tokens an attentional pooler (`visual.attn_pool`, `attn_pool_queries` queries
#            of embed_dim, `attn_pool_heads` heads) turns into the contrastive feature (the first) and the decoder's
#            image tokens (the rest) (nets/coca.py)
VISION_KINDS = ("vit", "resnet", "timm", "coca-vit")


# MLP activations of the OpenAI-style towers: OpenAI trained with QuickGELU (x * sigmoid(1.702 x)); LAION,
# DataComp and most other open_clip weights with exact GELU. Same keys and shapes, different features.
ACTIVATIONS = ("quick_gelu", "gelu")


def mlp_width(width: int, mlp_ratio: float) -> int:
    # open_clip truncates (int(width * mlp_ratio)): ViT-g-14's 1408 x 4.3637 is 6144, bigG's 1664 x 4.9231 is 8192.
    return int(width * mlp_ratio)


def mlp_ratio_of(width: int, hidden: int) -> float:
    """A ratio whose `mlp_width` is exactly `hidden` (hidden / width may land one ulp below it)."""
    ratio = hidden / width
    return ratio if mlp_width(width, ratio) == hidden else math.nextafter(ratio, math.inf)


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class VisionConfig:
    image_size: int
    patch_size: int
    width: int
    layers: int | tuple[int, ...]
    heads: int
    mlp_ratio: float = 4.0
    activation: str = "quick_gelu"
    kind: str = "vit"
    timm_model_name: str = ""  # the timm kind's architecture family; "" for the others
    # The vit kind's variant in open_clip (CLIPA's): no LayerNorm before the blocks, and the patch tokens' mean
    # ("avg", LayerNorm after pooling) pooled instead of the class token ("token").
    ln_pre: bool = True
    pool: str = "token"
    # The timm kind's head, in open_clip's terms (TimmModel's pool, proj, proj_bias): SigLIP's by default, so its rows
    # and their saved records read unchanged. proj "" is open_clip's null: timm's own classifier projects (EVA).
    timm_pool: str = "map"
    timm_proj: str = "none"
    timm_proj_bias: bool = False
    # What goes to timm.create_model besides the name, as (name, value) pairs; None: the ViT sizes above (SigLIP's).
    timm_kwargs: tuple | None = None
    # The coca-vit kind's attentional pooler; 0 for the others.
    attn_pool_queries: int = 0
    attn_pool_heads: int = 0

    @property
    def mlp_width(self) -> int:
        return mlp_width(self.width, self.mlp_ratio)

    def __post_init__(self):
        if self.kind not in VISION_KINDS:
            raise ValueError(f"vision kind {self.kind!r} is not one of {VISION_KINDS}")
        if (self.kind == "timm") != bool(self.timm_model_name):
            raise ValueError(f"timm_model_name {self.timm_model_name!r} goes with the timm kind only, and it needs one")
        if self.pool not in ("token", "avg"):
            raise ValueError(f"vision pool {self.pool!r} is not 'token' or 'avg'")
        if (self.kind == "coca-vit") != bool(self.attn_pool_queries and self.attn_pool_heads):
            raise ValueError("attn_pool_queries and attn_pool_heads go with the coca-vit kind only, and it needs both")
        if self.timm_kwargs is not None:  # read back from JSON as lists; tuples keep the config hashable
            object.__setattr__(self, "timm_kwargs", tuple((k, _tuples(v)) for k, v in self.timm_kwargs))
        if isinstance(self.layers, list):  # read back from JSON; a tuple keeps the config hashable
            object.__setattr__(self, "layers", tuple(self.layers))
        if (self.kind == "resnet") != isinstance(self.layers, tuple) or \
                (self.kind == "resnet" and len(self.layers) != 4):
            raise ValueError(f"a {self.kind} tower takes {'4 stage depths' if self.kind == 'resnet' else 'one int'} "
                             f"as layers, not {self.layers!r}")


@dataclass(frozen=True)
class TextConfig:
    kind: str
    context_length: int
    vocab_size: int
    width: int
    layers: int
    heads: int
    # OpenAI tower only; BERT towers take intermediate_size and BERT's own GELU.
    mlp_ratio: float = 4.0
    activation: str = "quick_gelu"
    # BERT-only sizes; unused by the OpenAI tower.
    intermediate_size: int = 0
    max_position_embeddings: int = 0
    type_vocab_size: int = 0
    # The OpenAI kind's variants in open_clip: attention without the causal mask (MobileCLIP, CLIPA), and the
    # pooled position: the largest id (OpenAI's EOT), the last position (CLIPA) or the first `eos_id` (MetaCLIP 2).
    causal: bool = True
    pool: str = "argmax"
    eos_id: int = 0
    # The Hugging Face tokenizer the weights were trained with, its files read from the weights' folder or the hub
    # (CLIPA's bert-base-uncased); "" for the kind's own (OpenAI's BPE, bert-base-chinese, SigLIP's beside the weights).
    tokenizer: str = ""
    # SigLIP's: its LayerNorms' eps, and a projection with a bias (or none at all: the width is the embedding).
    eps: float = 1e-5
    proj_bias: bool = False
    projection: bool = True
    # AltCLIP's: the width its `transformation` layer maps XLM-R's states to, before text_projection; 0 elsewhere.
    project_dim: int = 0
    # BERT-only training settings (bert-base-chinese's by default). They shape no tensor, so a checkpoint
    # cannot tell them and equality (phi_of, infer_config) ignores them.
    dropout: float = field(default=0.1, compare=False)
    initializer_range: float = field(default=0.02, compare=False)
    # The hf kind's (open_clip's HFTextEncoder): the transformers model type, open_clip's pooler and projection, and
    # the pad id that masks attention; its sizes are the fields above (width, layers, heads, intermediate_size,
    # vocab_size, max_position_embeddings, type_vocab_size, eps, activation). Defaults: records of other kinds.
    hf_family: str = ""
    hf_pooler: str = ""
    hf_proj: str = ""
    pad_id: int = 0

    def __post_init__(self):
        if self.pool not in TEXT_POOLS:
            raise ValueError(f"text pool {self.pool!r} is not one of {TEXT_POOLS}")
        if (self.kind == "hf") != bool(self.hf_family):
            raise ValueError(f"hf_family {self.hf_family!r} goes with the hf kind only, and it needs one")
        if self.kind == "hf" and (self.hf_family not in HF_FAMILIES or self.hf_pooler not in HF_POOLERS
                                  or self.hf_proj not in HF_PROJS):
            raise ValueError(f"hf text tower {self.hf_family!r} / {self.hf_pooler!r} / {self.hf_proj!r}: the family is "
                             f"one of {HF_FAMILIES}, the pooler of {HF_POOLERS}, the projection of {HF_PROJS}")

    @property
    def is_bert(self) -> bool:
        return self.kind.startswith("bert")

    @property
    def own_activation(self) -> bool:
        """Whether transformers builds the tower with its model's own MLP and activation (BERT, the hf kind), which
        open_clip's quick_gelu switch leaves alone."""
        return self.is_bert or self.kind == "hf"

    @property
    def mlp_width(self) -> int:
        return mlp_width(self.width, self.mlp_ratio)


@dataclass(frozen=True)
class DecoderConfig:
    """CoCa's multimodal text decoder (open_clip's multimodal_cfg): causal self-attention over the caption's token
    states, cross-attention to the image tokens, then logits over `vocab_size` (nets/coca.py)."""
    context_length: int
    vocab_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"

    @property
    def mlp_width(self) -> int:
        return mlp_width(self.width, self.mlp_ratio)


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    # SigLIP's learned logit bias, its starting value (open_clip's name); None: the model has none.
    init_logit_bias: float | None = None
    # CoCa's caption decoder; None: a model without one (every other family).
    decoder: DecoderConfig | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("init_logit_bias", "decoder"):  # records of models without them stay as they were
            if d[key] is None:
                del d[key]
        if not d["text"]["project_dim"]:  # and of towers without AltCLIP's transformation layer
            del d["text"]["project_dim"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "CLIPConfig":
        decoder = d.get("decoder")
        return cls(embed_dim=d["embed_dim"], vision=VisionConfig(**d["vision"]), text=TextConfig(**d["text"]),
                   init_logit_bias=d.get("init_logit_bias"),
                   decoder=None if decoder is None else DecoderConfig(**decoder))


def with_activation(config: CLIPConfig, activation: str) -> CLIPConfig:
    text = config.text if config.text.own_activation else replace(config.text, activation=activation)
    decoder = None if config.decoder is None else replace(config.decoder, activation=activation)
    return replace(config, vision=replace(config.vision, activation=activation), text=text, decoder=decoder)


def _openai_text(*, width: int, heads: int, layers: int = 12) -> TextConfig:
    """OpenAI's causal text tower at its context and vocabulary (every OpenAI and open_clip row here)."""
    return TextConfig(kind="openai", context_length=77, vocab_size=49408, width=width, layers=layers, heads=heads)


def _bert_base_chinese(kind: str, context_length: int) -> TextConfig:
    return TextConfig(kind=kind, context_length=context_length, vocab_size=21128, width=768, layers=12, heads=12,
                      intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)


_VIT_B_32 = VisionConfig(image_size=224, patch_size=32, width=768, layers=12, heads=12)
_VIT_B_16 = VisionConfig(image_size=224, patch_size=16, width=768, layers=12, heads=12)
_VIT_L_14 = VisionConfig(image_size=224, patch_size=14, width=1024, layers=24, heads=16)
# 64 px, patch 8: an 8x8 grid. Head width 64 as in every published model, so phi="auto" recovers it.
_VIT_T_8 = VisionConfig(image_size=64, patch_size=8, width=128, layers=3, heads=2)

# This project's rows: OpenAI's releases (QuickGELU, the dataclasses' default), the original repo's Chinese
# models and the tiny ones of the CPU tests and demos.
_PROJECT: dict[str, CLIPConfig] = {
    "openai/VIT-B-32": CLIPConfig(embed_dim=512, vision=_VIT_B_32, text=_openai_text(width=512, heads=8)),
    "openai/VIT-B-16": CLIPConfig(embed_dim=512, vision=_VIT_B_16, text=_openai_text(width=512, heads=8)),
    "openai/VIT-L-14": CLIPConfig(embed_dim=768, vision=_VIT_L_14, text=_openai_text(width=768, heads=12)),
    "openai/VIT-L-14-336": CLIPConfig(embed_dim=768, vision=replace(_VIT_L_14, image_size=336),
                                      text=_openai_text(width=768, heads=12)),
    # The original repo feeds BERT untruncated captions, so its context is BERT's own 512 positions.
    "self-cn/VIT-B-32": CLIPConfig(embed_dim=512, vision=_VIT_B_32, text=_bert_base_chinese("bert-pooler", 512)),
    "cn-clip/VIT-B-16": CLIPConfig(embed_dim=512, vision=_VIT_B_16, text=_bert_base_chinese("bert-cls", 52)),
    "tiny/VIT-T-8": CLIPConfig(embed_dim=128, vision=_VIT_T_8, text=_openai_text(width=128, heads=2, layers=3)),
    # Chinese-CLIP's [CLS] head: from scratch, self-cn's pooler head lets this small BERT collapse to one
    # text feature for every caption on some seeds. Dropout 0 and a wider init let it learn in minutes.
    "tiny-cn/VIT-T-8": CLIPConfig(embed_dim=128, vision=_VIT_T_8,
                                  text=TextConfig(kind="bert-cls", context_length=52, vocab_size=21128, width=128,
                                                  layers=3, heads=2, intermediate_size=512,
                                                  max_position_embeddings=128, type_vocab_size=2, dropout=0.0,
                                                  initializer_range=0.05)),
}


def _vit(*, image_size: int, patch_size: int, width: int, layers: int, head_width: int = 64,
         mlp_ratio: float = 4.0) -> VisionConfig:
    """An image tower in open_clip's JSON terms: its vision_cfg gives head_width, the table holds heads."""
    return VisionConfig(image_size=image_size, patch_size=patch_size, width=width, layers=layers,
                        heads=width // head_width, mlp_ratio=mlp_ratio)


# open_clip 3.3's configs whose towers are OpenAI's ViT and causal text transformer, with its model_configs
# JSON's sizes; each is two phis (_activation_twins).
OPEN_CLIP_VITS: dict[str, CLIPConfig] = {
    "ViT-S-32": CLIPConfig(embed_dim=384, vision=_vit(image_size=224, patch_size=32, width=384, layers=12),
                           text=_openai_text(width=384, heads=6)),
    "ViT-S-32-alt": CLIPConfig(embed_dim=256, vision=_vit(image_size=224, patch_size=32, width=384, layers=12),
                               text=_openai_text(width=256, heads=4, layers=10)),
    "ViT-S-16": CLIPConfig(embed_dim=384, vision=_vit(image_size=224, patch_size=16, width=384, layers=12),
                           text=_openai_text(width=384, heads=6)),
    "ViT-S-16-alt": CLIPConfig(embed_dim=256, vision=_vit(image_size=224, patch_size=16, width=384, layers=12),
                               text=_openai_text(width=256, heads=4, layers=10)),
    "ViT-M-32": CLIPConfig(embed_dim=512, vision=_vit(image_size=224, patch_size=32, width=512, layers=12),
                           text=_openai_text(width=512, heads=8)),
    "ViT-M-32-alt": CLIPConfig(embed_dim=384, vision=_vit(image_size=224, patch_size=32, width=512, layers=12),
                               text=_openai_text(width=384, heads=6)),
    "ViT-M-16": CLIPConfig(embed_dim=512, vision=_vit(image_size=224, patch_size=16, width=512, layers=12),
                           text=_openai_text(width=512, heads=8)),
    "ViT-B-32": CLIPConfig(embed_dim=512, vision=_vit(image_size=224, patch_size=32, width=768, layers=12),
                           text=_openai_text(width=512, heads=8)),
    "ViT-B-32-256": CLIPConfig(embed_dim=512, vision=_vit(image_size=256, patch_size=32, width=768, layers=12),
                               text=_openai_text(width=512, heads=8)),
    "ViT-B-32-plus-256": CLIPConfig(embed_dim=640, vision=_vit(image_size=256, patch_size=32, width=896, layers=12),
                                    text=_openai_text(width=640, heads=10)),
    "ViT-B-16": CLIPConfig(embed_dim=512, vision=_vit(image_size=224, patch_size=16, width=768, layers=12),
                           text=_openai_text(width=512, heads=8)),
    "ViT-B-16-plus": CLIPConfig(embed_dim=640, vision=_vit(image_size=224, patch_size=16, width=896, layers=12),
                                text=_openai_text(width=640, heads=10)),
    "ViT-B-16-plus-240": CLIPConfig(embed_dim=640, vision=_vit(image_size=240, patch_size=16, width=896, layers=12),
                                    text=_openai_text(width=640, heads=10)),
    "ViT-L-14": CLIPConfig(embed_dim=768, vision=_vit(image_size=224, patch_size=14, width=1024, layers=24),
                           text=_openai_text(width=768, heads=12)),
    "ViT-L-14-280": CLIPConfig(embed_dim=768, vision=_vit(image_size=280, patch_size=14, width=1024, layers=24),
                               text=_openai_text(width=768, heads=12)),
    "ViT-L-14-336": CLIPConfig(embed_dim=768, vision=_vit(image_size=336, patch_size=14, width=1024, layers=24),
                               text=_openai_text(width=768, heads=12)),
    "ViT-L-16": CLIPConfig(embed_dim=768, vision=_vit(image_size=224, patch_size=16, width=1024, layers=24),
                           text=_openai_text(width=768, heads=12)),
    "ViT-L-16-320": CLIPConfig(embed_dim=768, vision=_vit(image_size=320, patch_size=16, width=1024, layers=24),
                               text=_openai_text(width=768, heads=12)),
    "ViT-H-14": CLIPConfig(embed_dim=1024,
                           vision=_vit(image_size=224, patch_size=14, width=1280, layers=32, head_width=80),
                           text=_openai_text(width=1024, heads=16, layers=24)),
    "ViT-H-14-378": CLIPConfig(embed_dim=1024,
                               vision=_vit(image_size=378, patch_size=14, width=1280, layers=32, head_width=80),
                               text=_openai_text(width=1024, heads=16, layers=24)),
    "ViT-H-16": CLIPConfig(embed_dim=1024,
                           vision=_vit(image_size=224, patch_size=16, width=1280, layers=32, head_width=80),
                           text=_openai_text(width=1024, heads=16, layers=24)),
    "ViT-g-14": CLIPConfig(embed_dim=1024,
                           vision=_vit(image_size=224, patch_size=14, width=1408, layers=40, head_width=88,
                                       mlp_ratio=4.3637),
                           text=_openai_text(width=1024, heads=16, layers=24)),
    "ViT-bigG-14": CLIPConfig(embed_dim=1280,
                              vision=_vit(image_size=224, patch_size=14, width=1664, layers=48, head_width=104,
                                          mlp_ratio=4.9231),
                              text=_openai_text(width=1280, heads=20, layers=32)),
    "ViT-e-14": CLIPConfig(embed_dim=1280,
                           vision=_vit(image_size=224, patch_size=14, width=1792, layers=56, head_width=112,
                                       mlp_ratio=8.5715),
                           text=_openai_text(width=1280, heads=20, layers=36)),
}


def _resnet(*, image_size: int, width: int, layers: tuple[int, int, int, int]) -> VisionConfig:
    """OpenAI's ModifiedResNet: the attention pool is `width` x 32 wide with OpenAI's head width, 64."""
    return VisionConfig(kind="resnet", image_size=image_size, patch_size=32, width=width, layers=layers,
                        heads=width // 2)


# OpenAI's ResNet CLIPs with open_clip's sizes (its model_configs/RN*.json); each is three phis (_activation_twins).
_RESNETS: dict[str, CLIPConfig] = {
    "RN50": CLIPConfig(embed_dim=1024, vision=_resnet(image_size=224, width=64, layers=(3, 4, 6, 3)),
                       text=_openai_text(width=512, heads=8)),
    "RN101": CLIPConfig(embed_dim=512, vision=_resnet(image_size=224, width=64, layers=(3, 4, 23, 3)),
                        text=_openai_text(width=512, heads=8)),
    "RN50x4": CLIPConfig(embed_dim=640, vision=_resnet(image_size=288, width=80, layers=(4, 6, 10, 6)),
                         text=_openai_text(width=640, heads=10)),
    "RN50x16": CLIPConfig(embed_dim=768, vision=_resnet(image_size=384, width=96, layers=(6, 8, 18, 8)),
                          text=_openai_text(width=768, heads=12)),
    "RN50x64": CLIPConfig(embed_dim=1024, vision=_resnet(image_size=448, width=128, layers=(3, 15, 36, 10)),
                          text=_openai_text(width=1024, heads=16)),
}


def _activation_twins(rows: Mapping[str, CLIPConfig], openai_release: bool = False) -> dict[str, CLIPConfig]:
    """open_clip's name is exact GELU, as open_clip builds it; `<name>-quickgelu` OpenAI's QuickGELU. With
    `openai_release`, OpenAI's own weights come first as `openai/<name>` (QuickGELU), so phi_of names them."""
    table = {}
    for name, config in rows.items():
        gelu, quick = with_activation(config, "gelu"), with_activation(config, "quick_gelu")
        # open_clip's quick_gelu is one switch for the whole model: a ResNet tower records it, with no MLP
        # to use it.
        table.update({f"openai/{name}": quick, f"{name}-quickgelu": quick, name: gelu} if openai_release
                     else {name: gelu, f"{name}-quickgelu": quick})
    return table


# timm's SigLIP ViTs, as its `vit_{family}_siglip_{size}` entry points build them: (patch, width, layers, heads, MLP
# hidden width). No projection: the width is the embedding.
_SIGLIP_TRUNKS = {"base_patch16": (16, 768, 12, 12, 3072), "base_patch32": (32, 768, 12, 12, 3072),
                  "large_patch16": (16, 1024, 24, 16, 4096), "so400m_patch14": (14, 1152, 27, 16, 4304),
                  "so400m_patch16": (16, 1152, 27, 16, 4304), "giantopt_patch16": (16, 1536, 40, 16, 6144)}
# SigLIP's text towers: (width, heads, layers, MLP ratio) of the B, L and SO400M sizes (gopt uses SO400M's).
_SIGLIP_TEXTS = {"B": (768, 12, 12, 4.0), "L": (1024, 16, 24, 4.0), "SO400M": (1152, 16, 27, 3.7362)}
# Vocabularies: SigLIP's English and multilingual sentencepiece models, Gemma's for SigLIP 2.
_SIGLIP_VOCABS = {"en": 32000, "i18n": 250000, "gemma": 256000}


def _siglip(trunk: str, image_size: int, text: str, vocab: str, *, siglip2: bool, context_length: int = 64,
            projection: bool = True) -> CLIPConfig:
    """A SigLIP (siglip2: SigLIP 2, tanh GELU in the text tower) row in open_clip's JSON terms: its timm trunk at
    `image_size` and a text tower projected onto the trunk's width."""
    patch, width, layers, heads, hidden = _SIGLIP_TRUNKS[trunk]
    vision = VisionConfig(kind="timm", timm_model_name=f"vit_{trunk}_siglip_{image_size}", image_size=image_size,
                          patch_size=patch, width=width, layers=layers, heads=heads,
                          mlp_ratio=mlp_ratio_of(width, hidden), activation="gelu")
    t_width, t_heads, t_layers, t_ratio = _SIGLIP_TEXTS[text]
    text_config = TextConfig(kind="siglip", context_length=context_length, vocab_size=_SIGLIP_VOCABS[vocab],
                             width=t_width, layers=t_layers, heads=t_heads, mlp_ratio=t_ratio,
                             activation="gelu_tanh" if siglip2 else "gelu", eps=1e-6, proj_bias=projection,
                             projection=projection)
    return CLIPConfig(embed_dim=width, vision=vision, text=text_config, init_logit_bias=-10.0)


# open_clip 3.3's SigLIP and SigLIP 2 configs (model_configs/*SigLIP*.json), in its list_models() order.
SIGLIP: dict[str, CLIPConfig] = {
    "ViT-B-16-SigLIP": _siglip("base_patch16", 224, "B", "en", siglip2=False),
    "ViT-B-16-SigLIP2": _siglip("base_patch16", 224, "B", "gemma", siglip2=True),
    **{f"ViT-B-16-SigLIP2-{s}": _siglip("base_patch16", s, "B", "gemma", siglip2=True) for s in (256, 384, 512)},
    **{f"ViT-B-16-SigLIP-{s}": _siglip("base_patch16", s, "B", "en", siglip2=False) for s in (256, 384, 512)},
    "ViT-B-16-SigLIP-i18n-256": _siglip("base_patch16", 256, "B", "i18n", siglip2=False),
    "ViT-B-32-SigLIP2-256": _siglip("base_patch32", 256, "B", "gemma", siglip2=True),
    **{f"ViT-gopt-16-SigLIP2-{s}": _siglip("giantopt_patch16", s, "SO400M", "gemma", siglip2=True)
       for s in (256, 384)},
    **{f"ViT-L-16-SigLIP2-{s}": _siglip("large_patch16", s, "L", "gemma", siglip2=True) for s in (256, 384, 512)},
    **{f"ViT-L-16-SigLIP-{s}": _siglip("large_patch16", s, "L", "en", siglip2=False) for s in (256, 384)},
    # The first SO400M was trained on 16-token captions.
    "ViT-SO400M-14-SigLIP": _siglip("so400m_patch14", 224, "SO400M", "en", siglip2=False, context_length=16),
    "ViT-SO400M-14-SigLIP2": _siglip("so400m_patch14", 224, "SO400M", "gemma", siglip2=True),
    "ViT-SO400M-14-SigLIP2-378": _siglip("so400m_patch14", 378, "SO400M", "gemma", siglip2=True),
    **{f"ViT-SO400M-14-SigLIP-{s}": _siglip("so400m_patch14", s, "SO400M", "en", siglip2=False) for s in (378, 384)},
    **{f"ViT-SO400M-16-SigLIP2-{s}": _siglip("so400m_patch16", s, "SO400M", "gemma", siglip2=True)
       for s in (256, 384, 512)},
    # Its text features are the tower's width, with no projection.
    "ViT-SO400M-16-SigLIP-i18n-256": _siglip("so400m_patch16", 256, "SO400M", "i18n", siglip2=False,
                                             projection=False),
}


def _clipa(*, image_size: int, width: int, layers: int, head_width: int, mlp_ratio: float, text_width: int,
           text_heads: int, text_layers: int, embed_dim: int) -> CLIPConfig:
    """A CLIPA row (open_clip's ViT-*-CLIPA*.json): a ViT pooling its patch tokens' mean with no LayerNorm before the
    blocks, and a bidirectional text tower pooling the last of 32 positions, with bert-base-uncased's tokenizer."""
    vision = replace(_vit(image_size=image_size, patch_size=14, width=width, layers=layers, head_width=head_width,
                          mlp_ratio=mlp_ratio), activation="gelu", ln_pre=False, pool="avg")
    text = TextConfig(kind="openai", context_length=32, vocab_size=32000, width=text_width, layers=text_layers,
                      heads=text_heads, activation="gelu", causal=False, pool="last", tokenizer="bert-base-uncased")
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text)


CLIPA: dict[str, CLIPConfig] = {
    f"{name}{suffix}": _clipa(image_size=size, **sizes)
    for name, sizes in {
        "ViT-H-14-CLIPA": dict(width=1280, layers=32, head_width=80, mlp_ratio=4.0, text_width=1024, text_heads=16,
                               text_layers=24, embed_dim=1024),
        "ViT-L-14-CLIPA": dict(width=1024, layers=24, head_width=64, mlp_ratio=4.0, text_width=768, text_heads=12,
                               text_layers=12, embed_dim=768),
        "ViT-bigG-14-CLIPA": dict(width=1664, layers=48, head_width=104, mlp_ratio=4.9231, text_width=1280,
                                  text_heads=20, text_layers=32, embed_dim=1280),
    }.items() for suffix, size in (("-336", 336), ("", 224))
}


def _coca(*, embed_dim: int, image_size: int, patch_size: int, width: int, layers: int, text_width: int,
          text_heads: int, pool_heads: int = 8) -> CLIPConfig:
    """A CoCa row (open_clip's coca_ViT-*.json): a GELU ViT with a 256-query attentional pooler, the text tower with
    a class embedding after 76 caption tokens, and a caption decoder of the text tower's sizes."""
    vision = replace(_vit(image_size=image_size, patch_size=patch_size, width=width, layers=layers), kind="coca-vit",
                     activation="gelu", attn_pool_queries=256, attn_pool_heads=pool_heads)
    text = replace(_openai_text(width=text_width, heads=text_heads), kind="coca", context_length=76, activation="gelu")
    decoder = DecoderConfig(context_length=76, vocab_size=49408, width=text_width, layers=12, heads=text_heads)
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, decoder=decoder)


# open_clip 3.3's CoCa configs with pretrained weights (coca_base and coca_roberta have none: not built).
COCA: dict[str, CLIPConfig] = {
    "coca_ViT-B-32": _coca(embed_dim=512, image_size=224, patch_size=32, width=768, layers=12, text_width=512,
                           text_heads=8),
    "coca_ViT-L-14": _coca(embed_dim=768, image_size=224, patch_size=14, width=1024, layers=24, text_width=768,
                           text_heads=12),
}


def _worldwide(*, image_size: int, width: int, layers: int, head_width: int, mlp_ratio: float, text_width: int,
               text_heads: int, text_layers: int, embed_dim: int) -> CLIPConfig:
    """A MetaCLIP 2 "worldwide" row (open_clip's ViT-*-worldwide*.json): OpenAI's ViT and causal text tower, over
    XLM-V's 901,629-token vocabulary, pooling the first `</s>` (id 2) rather than the largest id."""
    vision = replace(_vit(image_size=image_size, patch_size=14, width=width, layers=layers, head_width=head_width,
                          mlp_ratio=mlp_ratio), activation="gelu")
    text = TextConfig(kind="openai", context_length=77, vocab_size=901629, width=text_width, layers=text_layers,
                      heads=text_heads, activation="gelu", pool="eos", eos_id=2, tokenizer="facebook/xlm-v-base")
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text)


_WORLDWIDE_H = dict(width=1280, layers=32, head_width=80, mlp_ratio=4.0, text_width=1024, text_heads=16,
                    text_layers=24, embed_dim=1024)
_WORLDWIDE_BIGG = dict(width=1664, layers=48, head_width=104, mlp_ratio=4.9231, text_width=1280, text_heads=20,
                       text_layers=32, embed_dim=1280)
# open_clip 3.3's MetaCLIP 2 configs with the XLM-V tokenizer; each is two phis (_activation_twins), so open_clip's
# own ViT-H-14-worldwide-quickgelu is the QuickGELU twin of ViT-H-14-worldwide.
WORLDWIDE: dict[str, CLIPConfig] = {
    "ViT-H-14-worldwide": _worldwide(image_size=224, **_WORLDWIDE_H),
    "ViT-H-14-worldwide-378": _worldwide(image_size=378, **_WORLDWIDE_H),
    "ViT-bigG-14-worldwide": _worldwide(image_size=224, **_WORLDWIDE_BIGG),
    "ViT-bigG-14-worldwide-378": _worldwide(image_size=378, **_WORLDWIDE_BIGG),
}


# Every phi: name -> its config as a plain dict (CLIPConfig.to_dict, the shape a weight file's arch record holds).
# A new family (or tower kind) is one more mapping of rows here.
MODEL_CONFIGS: dict[str, dict] = {name: config.to_dict() for name, config in {
    **_PROJECT,
    **_activation_twins(OPEN_CLIP_VITS),
    **_activation_twins(_RESNETS, openai_release=True),
    # 64 px, one block per stage: a ResNet CLIP small enough for the CPU tests and demos.
    "tiny/RN-T": CLIPConfig(embed_dim=128, vision=_resnet(image_size=64, width=16, layers=(1, 1, 1, 1)),
                            text=_openai_text(width=128, heads=2, layers=3)),
    **SIGLIP,
    **CLIPA,
    **_activation_twins(WORLDWIDE),
    **{name: CLIPConfig.from_dict(row) for name, row in ZOO.items()},  # the zoo's families, checked here
    **{name: CLIPConfig.from_dict(row) for name, row in HF_ROWS.items()},  # open_clip's HFTextEncoder models
    **COCA,
}.items()}


class UnknownModelError(UserError, ValueError):
    pass


class UnsupportedArchitectureError(UserError, ValueError):
    pass


def get_config(phi: str) -> CLIPConfig:
    if phi not in MODEL_CONFIGS:
        raise UnknownModelError(f"unknown phi {phi!r}; valid values: {', '.join(MODEL_CONFIGS)}, or 'auto' "
                                "to read the architecture from the checkpoint (README, 'Models')")
    return CLIPConfig.from_dict(MODEL_CONFIGS[phi])


def tower_key(tower: VisionConfig | TextConfig, heads: bool = True, activation: bool = True) -> tuple:
    """What builds a tower: its fields with the MLP ratio as the width it makes (4.9231 and 8192/1664 agree)."""
    fields = {**asdict(tower), "mlp_ratio": tower.mlp_width}
    if isinstance(tower, TextConfig):
        fields.pop("dropout"), fields.pop("initializer_range")
        if tower.is_bert:  # BERT builds its own MLP and GELU from intermediate_size
            fields.pop("mlp_ratio"), fields.pop("activation")
        elif tower.kind == "hf":  # its MLP is intermediate_size wide, the activation its family's (recorded)
            fields.pop("mlp_ratio")
    if not heads:
        fields.pop("heads")
    if not activation:
        fields.pop("activation", None)
    return tuple(sorted(fields.items()))


def same_architecture(a: CLIPConfig, b: CLIPConfig) -> bool:
    """Equal networks: every size, head count and activation (training-only settings aside)."""
    return a.embed_dim == b.embed_dim and tower_key(a.vision) == tower_key(b.vision) \
        and tower_key(a.text) == tower_key(b.text) \
        and (a.decoder is None) == (b.decoder is None) \
        and (a.decoder is None or tower_key(a.decoder) == tower_key(b.decoder))


def architecture_differences(a: CLIPConfig, b: CLIPConfig) -> list[str]:
    """Where towers with the same tensor shapes build different networks (heads, activation): weights of one load
    into the other without an error and compute something else."""
    found = []
    for name, x, y in (("image", a.vision, b.vision), ("text", a.text, b.text)):
        if tower_key(x, heads=False, activation=False) != tower_key(y, heads=False, activation=False):
            continue  # different shapes: the state dict check names them
        if x.heads != y.heads:
            found.append(f"{name} heads {x.heads} vs {y.heads}")
        if not (isinstance(x, TextConfig) and x.is_bert) and x.activation != y.activation:
            found.append(f"{name} activation {x.activation} vs {y.activation}")
    return found


def phi_of(config: CLIPConfig) -> str | None:
    """The first table name that builds the same network as `config`, or None for a custom architecture."""
    return next((phi for phi in MODEL_CONFIGS if same_architecture(get_config(phi), config)), None)
