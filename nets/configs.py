"""Model table: every `phi` is a row of data, turned into dataclasses here.

`infer_config` reads the same sizes back from a state dict in OpenAI's key layout, which is how
`phi="auto"` and checkpoints of unknown origin are built without guessing.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Mapping

import torch

from utils.errors import UserError

# Text tower kinds:
#   openai       causal BPE transformer, EOT pooling, ln_final, text_projection (OpenAI CLIP)
#   bert-pooler  BertModel pooler output -> ln_final -> text_projection (bubbliiiing's self-cn)
#   bert-cls     BertModel [CLS] hidden state -> text_projection (Chinese-CLIP)
TEXT_KINDS = ("openai", "bert-pooler", "bert-cls")


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


@dataclass(frozen=True)
class VisionConfig:
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    activation: str = "quick_gelu"

    @property
    def mlp_width(self) -> int:
        return mlp_width(self.width, self.mlp_ratio)


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
    # BERT-only training settings (bert-base-chinese's by default). They shape no tensor, so a checkpoint
    # cannot tell them and equality (phi_of, infer_config) ignores them.
    dropout: float = field(default=0.1, compare=False)
    initializer_range: float = field(default=0.02, compare=False)

    @property
    def is_bert(self) -> bool:
        return self.kind.startswith("bert")

    @property
    def mlp_width(self) -> int:
        return mlp_width(self.width, self.mlp_ratio)


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    vision: VisionConfig
    text: TextConfig

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "CLIPConfig":
        return cls(embed_dim=d["embed_dim"], vision=VisionConfig(**d["vision"]), text=TextConfig(**d["text"]))


def _openai_text(width: int, layers: int, heads: int) -> dict:
    return dict(kind="openai", context_length=77, vocab_size=49408, width=width, layers=layers, heads=heads)


def _bert_base_chinese(kind: str, context_length: int) -> dict:
    return dict(kind=kind, context_length=context_length, vocab_size=21128, width=768, layers=12, heads=12,
                intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)


_VIT_B_32 = dict(image_size=224, patch_size=32, width=768, layers=12, heads=12)
_VIT_B_16 = dict(image_size=224, patch_size=16, width=768, layers=12, heads=12)
_VIT_L_14 = dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16)
# 64 px, patch 8: an 8x8 grid. Head width 64 as in every published model, so phi="auto" recovers it.
_VIT_T_8 = dict(image_size=64, patch_size=8, width=128, layers=3, heads=2)

MODEL_CONFIGS: dict[str, dict] = {
    "openai/VIT-B-32": dict(embed_dim=512, vision=_VIT_B_32, text=_openai_text(512, 12, 8)),
    "openai/VIT-B-16": dict(embed_dim=512, vision=_VIT_B_16, text=_openai_text(512, 12, 8)),
    "openai/VIT-L-14": dict(embed_dim=768, vision=_VIT_L_14, text=_openai_text(768, 12, 12)),
    "openai/VIT-L-14-336": dict(embed_dim=768, vision=dict(_VIT_L_14, image_size=336), text=_openai_text(768, 12, 12)),
    # The original repo feeds BERT untruncated captions, so its context is BERT's own 512 positions.
    "self-cn/VIT-B-32": dict(embed_dim=512, vision=_VIT_B_32, text=_bert_base_chinese("bert-pooler", 512)),
    "cn-clip/VIT-B-16": dict(embed_dim=512, vision=_VIT_B_16, text=_bert_base_chinese("bert-cls", 52)),
    "tiny/VIT-T-8": dict(embed_dim=128, vision=_VIT_T_8, text=_openai_text(128, 3, 2)),
    # Chinese-CLIP's [CLS] head: from scratch, self-cn's pooler head lets this small BERT collapse to one
    # text feature for every caption on some seeds. Dropout 0 and a wider init let it learn in minutes.
    "tiny-cn/VIT-T-8": dict(embed_dim=128, vision=_VIT_T_8,
                            text=dict(kind="bert-cls", context_length=52, vocab_size=21128, width=128, layers=3,
                                      heads=2, intermediate_size=512, max_position_embeddings=128,
                                      type_vocab_size=2, dropout=0.0, initializer_range=0.05)),
}


class UnknownModelError(UserError, ValueError):
    pass


def get_config(phi: str) -> CLIPConfig:
    if phi not in MODEL_CONFIGS:
        raise UnknownModelError(f"unknown phi {phi!r}; valid values: {', '.join(MODEL_CONFIGS)}, or 'auto' "
                                "to read the architecture from the checkpoint")
    return CLIPConfig.from_dict(MODEL_CONFIGS[phi])


def phi_of(config: CLIPConfig) -> str | None:
    """The table name whose sizes equal `config`, or None for a custom architecture."""
    return next((phi for phi in MODEL_CONFIGS if get_config(phi) == config), None)


def _count_layers(state_dict: Mapping[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state_dict if (m := regex.match(k))})


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> CLIPConfig:
    """Sizes of a CLIP from tensor shapes in OpenAI's key layout (heads are width // 64, as published)."""
    sd = state_dict
    conv = sd["visual.conv1.weight"]  # (width, 3, patch, patch)
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vision = VisionConfig(image_size=conv.shape[-1] * grid, patch_size=conv.shape[-1], width=conv.shape[0],
                          layers=_count_layers(sd, r"visual\.transformer\.resblocks\.(\d+)\."),
                          heads=conv.shape[0] // 64)
    embed_dim = sd["text_projection"].shape[1]
    if "transformer.embeddings.word_embeddings.weight" in sd:
        words = sd["transformer.embeddings.word_embeddings.weight"]  # (vocab, width)
        positions = sd["transformer.embeddings.position_embeddings.weight"].shape[0]
        kind = "bert-pooler" if "ln_final.weight" in sd else "bert-cls"
        text = TextConfig(kind=kind, context_length=52 if kind == "bert-cls" else positions,
                          vocab_size=words.shape[0], width=words.shape[1],
                          layers=_count_layers(sd, r"transformer\.encoder\.layer\.(\d+)\."), heads=words.shape[1] // 64,
                          intermediate_size=sd["transformer.encoder.layer.0.intermediate.dense.weight"].shape[0],
                          max_position_embeddings=positions,
                          type_vocab_size=sd["transformer.embeddings.token_type_embeddings.weight"].shape[0])
        if kind == "bert-pooler" and positions != 512:
            text = TextConfig(**{**asdict(text), "context_length": min(77, positions)})
    else:
        width = sd["ln_final.weight"].shape[0]
        text = TextConfig(kind="openai", context_length=sd["positional_embedding"].shape[0],
                          vocab_size=sd["token_embedding.weight"].shape[0], width=width,
                          layers=_count_layers(sd, r"transformer\.resblocks\.(\d+)\."), heads=width // 64)
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text)
