"""Model table: every `phi` is a row of data (this project's, and open_clip's OpenAI-architecture ViTs), turned
into dataclasses here; `from_open_clip` reads open_clip's configs, `infer_config` a bare state dict's shapes."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Mapping

import torch

from utils.errors import UserError

# Text tower kinds:
#   openai       causal BPE transformer, EOT pooling, ln_final, text_projection (OpenAI CLIP)
#   bert-pooler  BertModel pooler output -> ln_final -> text_projection (bubbliiiing's self-cn)
#   bert-cls     BertModel [CLS] hidden state -> text_projection (Chinese-CLIP)
TEXT_KINDS = ("openai", "bert-pooler", "bert-cls")
# Image tower kinds:
#   vit      OpenAI's Vision Transformer: `layers` blocks of `width`, `patch_size` patches
#   resnet   OpenAI's ModifiedResNet: `layers` = blocks in each of its 4 stages, `width` = the stem's
#            channels, `heads` = the attention pool's; patch_size is 32, the stride of the grid it pools
VISION_KINDS = ("vit", "resnet")


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
    layers: int | tuple[int, ...]
    heads: int
    mlp_ratio: float = 4.0
    activation: str = "quick_gelu"
    kind: str = "vit"

    @property
    def mlp_width(self) -> int:
        return mlp_width(self.width, self.mlp_ratio)

    def __post_init__(self):
        if self.kind not in VISION_KINDS:
            raise ValueError(f"vision kind {self.kind!r} is not one of {VISION_KINDS}")
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

# open_clip 3.3's configs whose towers are OpenAI's ViT and causal text transformer, as its model_configs
# JSON gives them: name -> (embed_dim, (image size, patch, width, layers, head width, MLP ratio),
# (text width, heads, layers)); context 77 and vocabulary 49408 throughout. Each is two phis: open_clip's name
# with exact GELU, as open_clip builds it, and `<name>-quickgelu` with OpenAI's activation.
OPEN_CLIP_VITS: dict[str, tuple] = {
    "ViT-S-32": (384, (224, 32, 384, 12, 64, 4.0), (384, 6, 12)),
    "ViT-S-32-alt": (256, (224, 32, 384, 12, 64, 4.0), (256, 4, 10)),
    "ViT-S-16": (384, (224, 16, 384, 12, 64, 4.0), (384, 6, 12)),
    "ViT-S-16-alt": (256, (224, 16, 384, 12, 64, 4.0), (256, 4, 10)),
    "ViT-M-32": (512, (224, 32, 512, 12, 64, 4.0), (512, 8, 12)),
    "ViT-M-32-alt": (384, (224, 32, 512, 12, 64, 4.0), (384, 6, 12)),
    "ViT-M-16": (512, (224, 16, 512, 12, 64, 4.0), (512, 8, 12)),
    "ViT-B-32": (512, (224, 32, 768, 12, 64, 4.0), (512, 8, 12)),
    "ViT-B-32-256": (512, (256, 32, 768, 12, 64, 4.0), (512, 8, 12)),
    "ViT-B-32-plus-256": (640, (256, 32, 896, 12, 64, 4.0), (640, 10, 12)),
    "ViT-B-16": (512, (224, 16, 768, 12, 64, 4.0), (512, 8, 12)),
    "ViT-B-16-plus": (640, (224, 16, 896, 12, 64, 4.0), (640, 10, 12)),
    "ViT-B-16-plus-240": (640, (240, 16, 896, 12, 64, 4.0), (640, 10, 12)),
    "ViT-L-14": (768, (224, 14, 1024, 24, 64, 4.0), (768, 12, 12)),
    "ViT-L-14-280": (768, (280, 14, 1024, 24, 64, 4.0), (768, 12, 12)),
    "ViT-L-14-336": (768, (336, 14, 1024, 24, 64, 4.0), (768, 12, 12)),
    "ViT-L-16": (768, (224, 16, 1024, 24, 64, 4.0), (768, 12, 12)),
    "ViT-L-16-320": (768, (320, 16, 1024, 24, 64, 4.0), (768, 12, 12)),
    "ViT-H-14": (1024, (224, 14, 1280, 32, 80, 4.0), (1024, 16, 24)),
    "ViT-H-14-378": (1024, (378, 14, 1280, 32, 80, 4.0), (1024, 16, 24)),
    "ViT-H-16": (1024, (224, 16, 1280, 32, 80, 4.0), (1024, 16, 24)),
    "ViT-g-14": (1024, (224, 14, 1408, 40, 88, 4.3637), (1024, 16, 24)),
    "ViT-bigG-14": (1280, (224, 14, 1664, 48, 104, 4.9231), (1280, 20, 32)),
    "ViT-e-14": (1280, (224, 14, 1792, 56, 112, 8.5715), (1280, 20, 36)),
}


def _open_clip_row(embed_dim: int, vision: tuple, text: tuple, quick_gelu: bool) -> dict:
    image_size, patch_size, width, layers, head_width, mlp_ratio = vision
    return from_open_clip(dict(embed_dim=embed_dim, quick_gelu=quick_gelu,
                               vision_cfg=dict(image_size=image_size, patch_size=patch_size, width=width,
                                               layers=layers, head_width=head_width, mlp_ratio=mlp_ratio),
                               text_cfg=dict(width=text[0], heads=text[1], layers=text[2]))).to_dict()


class UnknownModelError(UserError, ValueError):
    pass


class UnsupportedArchitectureError(UserError, ValueError):
    pass


# open_clip's settings that this project's towers implement only at these values (its defaults); a config that
# sets another value builds a different network, so it is refused rather than approximated.
_OPEN_CLIP_VISION = dict(ls_init_value=None, attentional_pool=False, no_ln_pre=False, pos_embed_type="learnable",
                         final_ln_after_pool=False, pool_type="tok", output_tokens=False, act_kwargs=None,
                         norm_kwargs=None, block_type=None, qk_norm=False, scaled_cosine_attn=False,
                         scale_heads=False, scale_attn_inner=False, scale_attn=False, scale_fc=False,
                         timm_model_name=None)
_OPEN_CLIP_TEXT = dict(hf_tokenizer_name=None, tokenizer_mode=None, tokenizer_kwargs=None, ls_init_value=None,
                       embed_cls=False, pad_id=0, no_causal_mask=False, final_ln_after_pool=False, pool_type="argmax",
                       proj_bias=False, proj_type="linear", output_tokens=False, act_kwargs=None, norm_kwargs=None,
                       block_type=None, qk_norm=False, scaled_cosine_attn=False, scale_heads=False,
                       scale_attn_inner=False, scale_attn=False, scale_fc=False, hf_model_name=None)
_OPEN_CLIP_TOP = dict(custom_text=False, init_logit_bias=None, multimodal_cfg=None, nonscalar_logit_scale=False)
# Any value is exact: these act in training only (patch dropout, the temperature's start), or only together with
# a setting refused above (timm_*, hf_*, the attentional pooler's, EOS pooling's id).
_OPEN_CLIP_TRAINING = {"patch_dropout", "init_logit_scale", "attn_pooler_queries", "attn_pooler_heads", "eos_id",
                       "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop",
                       "timm_drop_path", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
_OPEN_CLIP_SIZES = {"vision": {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio"},
                    "text": {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"},
                    "top": {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}}


def _square(value, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UnsupportedArchitectureError(f"open_clip config: non-square {what} {list(value)} is not supported")
        value = value[0]
    return int(value)


def unsupported_open_clip_settings(model_cfg: Mapping) -> list[str]:
    """open_clip settings in `model_cfg` that the towers here cannot build exactly ([] when it is exact)."""
    found = []
    for part, defaults, sizes in (("", _OPEN_CLIP_TOP, _OPEN_CLIP_SIZES["top"]),
                                  ("vision_cfg.", _OPEN_CLIP_VISION, _OPEN_CLIP_SIZES["vision"]),
                                  ("text_cfg.", _OPEN_CLIP_TEXT, _OPEN_CLIP_SIZES["text"])):
        cfg = model_cfg.get(part[:-1], {}) if part else model_cfg
        for key, value in cfg.items():
            if key in sizes or key in _OPEN_CLIP_TRAINING or (key in defaults and value == defaults[key]):
                continue
            found.append(f"{part}{key}={value!r}")
    return found


def from_open_clip(model_cfg: Mapping) -> CLIPConfig:
    """The config of an open_clip `model_cfg` (its JSON's content, as `open_clip_config.json` holds it).

    open_clip's own defaults fill what the JSON leaves out (head width 64, MLP ratio 4, patch 16, context 77,
    ...); `quick_gelu` picks the activation of both towers, GELU when absent, as open_clip does.
    """
    if bad := unsupported_open_clip_settings(model_cfg):
        raise UnsupportedArchitectureError(f"open_clip config sets {', '.join(bad)}: not an OpenAI-style ViT + "
                                           "causal text model, which is what this project builds exactly")
    v, t = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    activation = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    resnet = isinstance(v.get("layers"), (list, tuple))  # a ModifiedResNet: its attention pool is width * 32 wide
    width = v.get("width", 768)
    head_width = v.get("head_width", 64)
    if (width * 32 if resnet else width) % head_width:
        raise UnsupportedArchitectureError(f"open_clip config: vision width {width} is not a multiple of its head "
                                           f"width {head_width}")
    if resnet:
        vision = VisionConfig(kind="resnet", image_size=_square(v.get("image_size", 224), "image_size"),
                              patch_size=32, width=width, layers=tuple(v["layers"]), heads=width * 32 // head_width,
                              activation=activation)
    else:
        vision = VisionConfig(image_size=_square(v.get("image_size", 224), "image_size"),
                              patch_size=_square(v.get("patch_size", 16), "patch_size"), width=width,
                              layers=v.get("layers", 12), heads=width // head_width,
                              mlp_ratio=float(v.get("mlp_ratio", 4.0)), activation=activation)
    text = TextConfig(kind="openai", context_length=t.get("context_length", 77), vocab_size=t.get("vocab_size", 49408),
                      width=t.get("width", 512), layers=t.get("layers", 12), heads=t.get("heads", 8),
                      mlp_ratio=float(t.get("mlp_ratio", 4.0)), activation=activation)
    return CLIPConfig(embed_dim=model_cfg["embed_dim"], vision=vision, text=text)


MODEL_CONFIGS.update({f"{name}{suffix}": _open_clip_row(*row, quick_gelu=bool(suffix))
                      for name, row in OPEN_CLIP_VITS.items() for suffix in ("", "-quickgelu")})

# OpenAI's ResNet CLIPs with open_clip's sizes (its model_configs/RN*.json): name -> (embed_dim, blocks per
# stage, stem width, image size, text width, text heads). The attention pool has OpenAI's head width, 64: its
# input is stem width x 32 wide. The text tower is OpenAI's 12-layer causal transformer.
_RESNETS = {
    "RN50": (1024, (3, 4, 6, 3), 64, 224, 512, 8),
    "RN101": (512, (3, 4, 23, 3), 64, 224, 512, 8),
    "RN50x4": (640, (4, 6, 10, 6), 80, 288, 640, 10),
    "RN50x16": (768, (6, 8, 18, 8), 96, 384, 768, 12),
    "RN50x64": (1024, (3, 15, 36, 10), 128, 448, 1024, 16),
}


def _resnet(embed_dim: int, blocks: tuple, width: int, image_size: int, text: dict) -> dict:
    vision = dict(kind="resnet", image_size=image_size, patch_size=32, width=width, layers=blocks, heads=width // 2)
    return dict(embed_dim=embed_dim, vision=vision, text=text)


for _name, (_embed, _blocks, _width, _size, _text_width, _text_heads) in _RESNETS.items():
    _row = _resnet(_embed, _blocks, _width, _size, _openai_text(_text_width, 12, _text_heads))
    # OpenAI trained its ResNets' text towers with QuickGELU; open_clip's name without -quickgelu is exact GELU.
    MODEL_CONFIGS[f"openai/{_name}"] = MODEL_CONFIGS[f"{_name}-quickgelu"] = _row
    # open_clip's quick_gelu is one switch for the whole model; a ResNet tower has no MLP to use it.
    MODEL_CONFIGS[_name] = dict(_row, vision=dict(_row["vision"], activation="gelu"),
                                text=dict(_row["text"], activation="gelu"))
# 64 px, one block per stage: a ResNet CLIP small enough for the CPU tests and demos.
MODEL_CONFIGS["tiny/RN-T"] = _resnet(128, (1, 1, 1, 1), 16, 64, _openai_text(128, 3, 2))


def get_config(phi: str) -> CLIPConfig:
    if phi not in MODEL_CONFIGS:
        raise UnknownModelError(f"unknown phi {phi!r}; valid values: {', '.join(MODEL_CONFIGS)}, or 'auto' "
                                "to read the architecture from the checkpoint (README, 'Models')")
    return CLIPConfig.from_dict(MODEL_CONFIGS[phi])


def _tower_key(tower: VisionConfig | TextConfig, heads: bool = True, activation: bool = True) -> tuple:
    """What builds a tower: its fields with the MLP ratio as the width it makes (4.9231 and 8192/1664 agree)."""
    fields = {**asdict(tower), "mlp_ratio": tower.mlp_width}
    if isinstance(tower, TextConfig):
        fields.pop("dropout"), fields.pop("initializer_range")
        if tower.is_bert:  # BERT builds its own MLP and GELU from intermediate_size
            fields.pop("mlp_ratio"), fields.pop("activation")
    if not heads:
        fields.pop("heads")
    if not activation:
        fields.pop("activation", None)
    return tuple(sorted(fields.items()))


def same_architecture(a: CLIPConfig, b: CLIPConfig) -> bool:
    """Equal networks: every size, head count and activation (training-only settings aside)."""
    return a.embed_dim == b.embed_dim and _tower_key(a.vision) == _tower_key(b.vision) \
        and _tower_key(a.text) == _tower_key(b.text)


def architecture_differences(a: CLIPConfig, b: CLIPConfig) -> list[str]:
    """Where towers with the same tensor shapes build different networks (heads, activation): weights of one load
    into the other without an error and compute something else."""
    found = []
    for name, x, y in (("image", a.vision, b.vision), ("text", a.text, b.text)):
        if _tower_key(x, heads=False, activation=False) != _tower_key(y, heads=False, activation=False):
            continue  # different shapes: the state dict check names them
        if x.heads != y.heads:
            found.append(f"{name} heads {x.heads} vs {y.heads}")
        if not (isinstance(x, TextConfig) and x.is_bert) and x.activation != y.activation:
            found.append(f"{name} activation {x.activation} vs {y.activation}")
    return found


def phi_of(config: CLIPConfig) -> str | None:
    """The first table name that builds the same network as `config`, or None for a custom architecture."""
    return next((phi for phi in MODEL_CONFIGS if same_architecture(get_config(phi), config)), None)


def with_activation(config: CLIPConfig, activation: str) -> CLIPConfig:
    text = config.text if config.text.is_bert else replace(config.text, activation=activation)
    return replace(config, vision=replace(config.vision, activation=activation), text=text)


def _count_layers(state_dict: Mapping[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state_dict if (m := regex.match(k))})


def _resnet_shapes(sd: Mapping[str, torch.Tensor]) -> VisionConfig:
    """A ModifiedResNet's sizes from its shapes; heads=0: the attention pool's head count is in no shape."""
    grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    return VisionConfig(kind="resnet", image_size=grid * 32, patch_size=32, width=sd["visual.conv3.weight"].shape[0],
                        layers=tuple(_count_layers(sd, rf"visual\.layer{i}\.(\d+)\.") for i in range(1, 5)), heads=0)


class UnknownHeadsError(UserError, ValueError):
    pass


def _table_tower(shapes: VisionConfig | TextConfig, part: str) -> VisionConfig | TextConfig:
    """The table's tower with these tensor shapes: it knows the head count, which no tensor shape shows."""
    key = _tower_key(shapes, heads=False, activation=False)
    towers = {_tower_key(getattr(get_config(phi), part)): getattr(get_config(phi), part) for phi in MODEL_CONFIGS}
    found = {t.heads: t for t in towers.values() if _tower_key(t, heads=False, activation=False) == key}
    if len(found) != 1:
        what = "image" if part == "vision" else "text"
        sizes = f"width {shapes.width}, {shapes.layers} layers"
        raise UnknownHeadsError(
            f"the {what} tower's tensor shapes ({sizes}) match no phi in the table, so its number of attention "
            "heads is unknown (shapes do not show it); pass the phi it was trained as, or record its architecture "
            "beside the file (README, 'Models')")
    tower = next(iter(found.values()))
    return replace(shapes, heads=tower.heads, mlp_ratio=tower.mlp_ratio)  # the table's ratio: 4.9231, not 8192/1664


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> CLIPConfig:
    """The architecture of a state dict in OpenAI's key layout, from its tensor shapes and the table.

    Shapes give every size but not the head counts, which come from the table row whose tower has the same
    shapes (`UnknownHeadsError` when none has), nor the activation: the result uses OpenAI's QuickGELU, which
    the original repo's and OpenAI's files need; `with_activation` makes the GELU twin.
    """
    sd = state_dict
    if "visual.attnpool.positional_embedding" in sd:
        vision = _resnet_shapes(sd)
    else:
        conv = sd["visual.conv1.weight"]  # (width, 3, patch, patch)
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        width = conv.shape[0]
        vision = VisionConfig(image_size=conv.shape[-1] * grid, patch_size=conv.shape[-1], width=width,
                              layers=_count_layers(sd, r"visual\.transformer\.resblocks\.(\d+)\."), heads=0,
                              mlp_ratio=mlp_ratio_of(width, sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]))
    embed_dim = sd["text_projection"].shape[1]
    if "transformer.embeddings.word_embeddings.weight" in sd:
        words = sd["transformer.embeddings.word_embeddings.weight"]  # (vocab, width)
        positions = sd["transformer.embeddings.position_embeddings.weight"].shape[0]
        kind = "bert-pooler" if "ln_final.weight" in sd else "bert-cls"
        text = TextConfig(kind=kind, context_length=52 if kind == "bert-cls" else positions,
                          vocab_size=words.shape[0], width=words.shape[1],
                          layers=_count_layers(sd, r"transformer\.encoder\.layer\.(\d+)\."), heads=0,
                          intermediate_size=sd["transformer.encoder.layer.0.intermediate.dense.weight"].shape[0],
                          max_position_embeddings=positions,
                          type_vocab_size=sd["transformer.embeddings.token_type_embeddings.weight"].shape[0])
        if kind == "bert-pooler" and positions != 512:
            text = replace(text, context_length=min(77, positions))
    else:
        text_width = sd["ln_final.weight"].shape[0]
        text = TextConfig(kind="openai", context_length=sd["positional_embedding"].shape[0],
                          vocab_size=sd["token_embedding.weight"].shape[0], width=text_width,
                          layers=_count_layers(sd, r"transformer\.resblocks\.(\d+)\."), heads=0,
                          mlp_ratio=mlp_ratio_of(text_width, sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]))
    return CLIPConfig(embed_dim=embed_dim, vision=_table_tower(vision, "vision"), text=_table_tower(text, "text"))
