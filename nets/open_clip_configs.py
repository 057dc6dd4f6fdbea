"""open_clip's model configs (its model_configs/*.json, a weights folder's open_clip_config.json) read into this
project's CLIPConfig: each tower kind at the settings it builds, and a setting it does not build refused by name
rather than approximated."""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import torch

from .configs import (TEXT_POOLS, CLIPConfig, DecoderConfig, TextConfig, UnsupportedArchitectureError, VisionConfig,
                      mlp_ratio_of)
from .hf_rows import HF_POOLERS, HF_TEXT_MODELS


# open_clip's settings that this project's towers implement only at these values (its defaults); a config that
# sets another value builds a different network, so it is refused rather than approximated.
_OPEN_CLIP_VISION = dict(ls_init_value=None, attentional_pool=False, pos_embed_type="learnable", output_tokens=False,
                         act_kwargs=None,
                         norm_kwargs=None, block_type=None, qk_norm=False, scaled_cosine_attn=False,
                         scale_heads=False, scale_attn_inner=False, scale_attn=False, scale_fc=False,
                         timm_model_name=None)
_OPEN_CLIP_TEXT = dict(tokenizer_mode=None, ls_init_value=None,
                       embed_cls=False, pad_id=0, final_ln_after_pool=False, proj_bias=False, proj_type="linear", output_tokens=False, act_kwargs=None, norm_kwargs=None,
                       block_type=None, qk_norm=False, scaled_cosine_attn=False, scale_heads=False,
                       scale_attn_inner=False, scale_attn=False, scale_fc=False, hf_model_name=None)
_OPEN_CLIP_TOP = dict(custom_text=False, init_logit_bias=None, multimodal_cfg=None, nonscalar_logit_scale=False)
# Any value is exact: these act in training only (patch dropout, the temperature's start), or only together with
# a setting refused above (timm_*, hf_*, the attentional pooler's, EOS pooling's id).
_OPEN_CLIP_TRAINING = {"patch_dropout", "init_logit_scale", "attn_pooler_queries", "attn_pooler_heads",
                       "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop",
                       "timm_drop_path", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
# Read by from_open_clip (the variants' values it cannot build are refused there, named).
_OPEN_CLIP_SIZES = {"vision": {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio", "no_ln_pre",
                               "pool_type", "final_ln_after_pool"},
                    "text": {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "no_causal_mask",
                             "pool_type", "eos_id", "hf_tokenizer_name", "tokenizer_kwargs"},
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
    v, t = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    for check, part in ((_open_clip_vit_variant, v), (_open_clip_text_variant, t)):
        try:
            check(part)
        except UnsupportedArchitectureError as e:
            found.append(str(e).removeprefix("open_clip config: "))
    return found


def from_open_clip(model_cfg: Mapping) -> CLIPConfig:
    """The config of an open_clip `model_cfg` (its JSON's content, as `open_clip_config.json` holds it).

    open_clip's own defaults fill what the JSON leaves out (head width 64, MLP ratio 4, patch 16, context 77,
    ...); `quick_gelu` picks the activation of both towers, GELU when absent, as open_clip does.
    """
    if model_cfg.get("multimodal_cfg") is not None:
        return _from_open_clip_coca(model_cfg)
    if model_cfg.get("text_cfg", {}).get("hf_model_name"):
        return _from_open_clip_hf(model_cfg)
    if model_cfg.get("vision_cfg", {}).get("timm_model_name"):
        # SigLIP's unprojected attention-pooled trunk and bidirectional text tower pooling the last position go
        # together (its path names what differs from them); other timm towers (ConvNeXt, EVA, ...) come with OpenAI's
        # text tower, causal or not (MobileCLIP's FastViTs: no causal mask, still pooling the EOT token).
        v, t = model_cfg["vision_cfg"], model_cfg.get("text_cfg", {})
        if (v.get("timm_pool"), v.get("timm_proj")) == ("map", "none") or \
                (t.get("no_causal_mask") and t.get("pool_type", "argmax") != "argmax"):
            return _from_open_clip_siglip(model_cfg)
        return _from_open_clip_timm(model_cfg)
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
    vision = replace(vision, **_open_clip_vit_variant(v))
    return CLIPConfig(embed_dim=model_cfg["embed_dim"], vision=vision, text=_openai_text_of(t, activation))


def _openai_text_of(t: Mapping, activation: str) -> TextConfig:
    """OpenAI's text tower (and its open_clip variants) from a text_cfg, open_clip's defaults filling what it lacks."""
    return TextConfig(kind="openai", context_length=t.get("context_length", 77), vocab_size=t.get("vocab_size", 49408),
                      width=t.get("width", 512), layers=t.get("layers", 12), heads=t.get("heads", 8),
                      mlp_ratio=float(t.get("mlp_ratio", 4.0)), activation=activation, **_open_clip_text_variant(t))


# Tokenizers of open_clip's configs built here (utils/tokenizer.py): the Hugging Face name -> its settings.
HF_TOKENIZERS = {"bert-base-uncased": {"strip_sep_token": True}}
# The hf text towers' own: open_clip's HFTokenizer at its defaults (no tokenizer_kwargs in their configs).
HF_TOKENIZERS.update({name: {} for name in HF_TEXT_MODELS})
# XLM-V (MetaCLIP 2): open_clip's HFTokenizer at its defaults, its </s> pooled (eos_id 2), its padding id 1.
HF_TOKENIZERS["facebook/xlm-v-base"] = {}


def _open_clip_vit_variant(v: Mapping) -> dict:
    """VisionConfig's fields for open_clip's ViT variants: CLIPA's average pool with the LayerNorm after it."""
    pool = v.get("pool_type", "tok")
    if pool not in ("tok", "avg") or (pool == "avg") != bool(v.get("final_ln_after_pool", False)):
        raise UnsupportedArchitectureError(f"open_clip config: vision pool_type={pool!r} with final_ln_after_pool="
                                           f"{v.get('final_ln_after_pool', False)!r}; the ViT here pools the class "
                                           "token, or the patch tokens' mean with the LayerNorm after it (CLIPA)")
    return {"ln_pre": not v.get("no_ln_pre", False), "pool": "avg" if pool == "avg" else "token"}


def _open_clip_text_variant(t: Mapping) -> dict:
    """TextConfig's fields for open_clip's text variants: no causal mask, the pooled position, the tokenizer."""
    pool = t.get("pool_type", "argmax")
    if pool not in TEXT_POOLS:
        raise UnsupportedArchitectureError(f"open_clip config: text pool_type={pool!r}; the text towers here pool "
                                           f"{', '.join(TEXT_POOLS)}")
    name, kwargs = t.get("hf_tokenizer_name"), t.get("tokenizer_kwargs") or {}
    if name is not None and HF_TOKENIZERS.get(name) != kwargs:
        raise UnsupportedArchitectureError(f"open_clip config: tokenizer {name!r} with {kwargs!r} is not built here "
                                           f"(built: {', '.join(f'{k} {v}' for k, v in HF_TOKENIZERS.items())})")
    if name is None and kwargs:
        raise UnsupportedArchitectureError(f"open_clip config: tokenizer_kwargs={kwargs!r} for OpenAI's tokenizer")
    return {"causal": not t.get("no_causal_mask", False), "pool": pool,
            "eos_id": int(t.get("eos_id", 0)) if pool == "eos" else 0, "tokenizer": name or ""}


# SigLIP's settings in open_clip's terms: (part, key) -> the values its towers here build (a timm trunk pooled by
# its attention head with no projection; a bidirectional text tower pooling the last position). Any other setting
# of an open_clip config with a timm trunk is refused, named.
_SIGLIP_FIXED = {("vision_cfg", "timm_pool"): ("map",), ("vision_cfg", "timm_proj"): ("none",),
                 ("text_cfg", "no_causal_mask"): (True,), ("text_cfg", "pool_type"): ("last",),
                 ("text_cfg", "proj_type"): ("linear", "none"), ("text_cfg", "act_kwargs"): (None, {"approximate": "tanh"}),
                 ("", "custom_text"): (True, False), ("", "quick_gelu"): (False,)}
_SIGLIP_REQUIRED = (("vision_cfg", "timm_pool"), ("vision_cfg", "timm_proj"), ("text_cfg", "no_causal_mask"),
                    ("text_cfg", "pool_type"))
# Read below, or shaping no tensor here (the tokenizer's: utils/tokenizer.py reads the files beside the weights).
_SIGLIP_READ = {"": {"embed_dim", "init_logit_bias", "vision_cfg", "text_cfg"},
                "vision_cfg": {"image_size", "timm_model_name"},
                "text_cfg": {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "proj_bias",
                             "norm_kwargs", "hf_tokenizer_name", "tokenizer_kwargs"}}


def _timm_vision(model_name: str, image_size: int) -> VisionConfig:
    """timm's `model_name` at `image_size` as a row: its sizes read from a build on the meta device (nothing
    allocated), as nets/vision_timm.py builds it."""
    import timm  # a second to import; only SigLIP configs need it

    try:
        with torch.device("meta"):
            trunk = timm.create_model(model_name, pretrained=False, num_classes=0, global_pool="map",
                                      img_size=image_size)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise UnsupportedArchitectureError(f"open_clip config: timm has no model {model_name!r} ({e})") from e
    block = trunk.blocks[0]
    return VisionConfig(kind="timm", timm_model_name=model_name, image_size=image_size,
                        patch_size=trunk.patch_embed.patch_size[0], width=trunk.embed_dim, layers=len(trunk.blocks),
                        heads=block.attn.num_heads, mlp_ratio=mlp_ratio_of(trunk.embed_dim, block.mlp.fc1.out_features),
                        activation="gelu")


# open_clip's TimmModel settings a generic timm tower builds (its defaults: average pooling, a linear head), and the
# heads nets/vision_timm.py builds; "" is open_clip's null proj (timm's own classifier projects).
_TIMM_VISION = {"timm_model_name", "timm_pool", "timm_proj", "timm_proj_bias", "image_size"}
_TIMM_POOLS = ("", "avg", "token", "map", "max", "avgmax", "abs_attn", "rot_attn")
_TIMM_PROJS = ("", "linear", "mlp", "none")


def _timm_head_vision(v: Mapping) -> VisionConfig:
    """A generic timm tower (open_clip's TimmModel with any head): timm's defaults for the name, as open_clip
    builds it, and the trunk's sizes for the record, read from a build on the meta device (nothing allocated)."""
    import timm  # a second to import; only timm towers need it

    bad = [f"vision_cfg.{k}={val!r}" for k, val in v.items() if k not in _TIMM_VISION and k not in _OPEN_CLIP_TRAINING]
    pool, proj = v.get("timm_pool", "avg") or "", v.get("timm_proj", "linear") or ""
    bad += [f"vision_cfg.timm_pool={pool!r}"] * (pool not in _TIMM_POOLS)
    bad += [f"vision_cfg.timm_proj={proj!r}"] * (proj not in _TIMM_PROJS)
    if bad:
        raise UnsupportedArchitectureError(f"open_clip config sets {', '.join(bad)}: not a timm image tower this "
                                           "project builds (timm_model_name, timm_pool, timm_proj, timm_proj_bias)")
    name = v["timm_model_name"]
    try:
        with torch.device("meta"):
            trunk = timm.create_model(name, pretrained=False)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise UnsupportedArchitectureError(f"open_clip config: timm has no model {name!r} ({e})") from e
    blocks = getattr(trunk, "blocks", None)
    attn = getattr(blocks[0], "attn", None) if blocks is not None else None
    # The grid's stride: a hybrid stem's (ViTamin, MobileCLIP) patch embedding is 1 x 1 on its output.
    patch = trunk.feature_info[-1]["reduction"] if getattr(trunk, "feature_info", None) else \
        trunk.patch_embed.patch_size[0]
    layers = len(blocks) if blocks is not None else sum(len(s.blocks) for s in getattr(trunk, "stages", ()))
    return VisionConfig(kind="timm", timm_model_name=name, image_size=_square(v.get("image_size", 224), "image_size"),
                        patch_size=int(patch), width=trunk.num_features, layers=layers,
                        heads=getattr(attn, "num_heads", 0), activation="gelu", timm_pool=pool, timm_proj=proj,
                        timm_proj_bias=bool(v.get("timm_proj_bias", False)), timm_kwargs=())


def _from_open_clip_timm(model_cfg: Mapping) -> CLIPConfig:
    """An open_clip config with a timm image tower (ConvNeXt, EVA, MobileCLIP, ...) and OpenAI's text tower (causal
    unless no_causal_mask)."""
    # custom_text only moves the same text tower's keys under `text.` (EVA's files).
    rest = {k: val for k, val in model_cfg.items() if k not in ("vision_cfg", "custom_text")}
    if bad := unsupported_open_clip_settings(rest):
        raise UnsupportedArchitectureError(f"open_clip config sets {', '.join(bad)}: a timm image tower is built "
                                           "here with OpenAI's text tower at open_clip's defaults")
    activation = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    text = _openai_text_of(model_cfg.get("text_cfg", {}), activation)
    if model_cfg.get("custom_text", False):
        text = replace(text, kind="openai-custom")
    return CLIPConfig(embed_dim=model_cfg["embed_dim"], vision=_timm_head_vision(model_cfg["vision_cfg"]), text=text)


def _from_open_clip_siglip(model_cfg: Mapping) -> CLIPConfig:
    """An open_clip config with a timm trunk: SigLIP's towers, exactly, or refused with the settings that differ."""
    v, t = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    bad = []
    for part, cfg in (("", model_cfg), ("vision_cfg", v), ("text_cfg", t)):
        for key, value in cfg.items():
            if (part, key) in _SIGLIP_FIXED:
                if value in _SIGLIP_FIXED[part, key]:
                    continue
            elif key in _SIGLIP_READ[part] or key in _OPEN_CLIP_TRAINING:
                continue
            bad.append(f"{part + '.' if part else ''}{key}={value!r}")
    norm = t.get("norm_kwargs") or {}
    if set(norm) - {"eps"}:
        bad.append(f"text_cfg.norm_kwargs={norm!r}")
    # open_clip's defaults for these (average pooling and a linear head, causal, argmax pooling) are not SigLIP's.
    bad += [f"{part}.{key} unset" for part, key in _SIGLIP_REQUIRED if key not in (v if part == "vision_cfg" else t)]
    if bad:
        raise UnsupportedArchitectureError(f"open_clip config sets {', '.join(bad)}: a timm image tower is built "
                                           "here only as SigLIP's (timm_pool='map', timm_proj='none', a text tower "
                                           "with no_causal_mask and pool_type='last')")
    image_size = _square(v.get("image_size", 224), "image_size")
    vision = _timm_vision(v["timm_model_name"], image_size)
    projection = t.get("proj_type", "linear") != "none"
    tanh = (t.get("act_kwargs") or {}).get("approximate") == "tanh"
    text = TextConfig(kind="siglip", context_length=t.get("context_length", 77), vocab_size=t.get("vocab_size", 49408),
                      width=t.get("width", 512), layers=t.get("layers", 12), heads=t.get("heads", 8),
                      mlp_ratio=float(t.get("mlp_ratio", 4.0)), activation="gelu_tanh" if tanh else "gelu",
                      eps=float(norm.get("eps", 1e-5)), proj_bias=bool(t.get("proj_bias", False)) and projection,
                      projection=projection)
    if vision.width != model_cfg["embed_dim"] or (not projection and text.width != model_cfg["embed_dim"]):
        raise UnsupportedArchitectureError(f"open_clip config: embed_dim {model_cfg['embed_dim']} is not the width of "
                                           f"its unprojected tower (image {vision.width}, text {text.width})")
    bias = model_cfg.get("init_logit_bias")
    return CLIPConfig(embed_dim=model_cfg["embed_dim"], vision=vision, text=text,
                      init_logit_bias=None if bias is None else float(bias))


# open_clip's text_cfg keys of an HFTextEncoder read here, and the TextTransformer sizes open_clip ignores for one
# (it builds the tower from hf_model_name's config).
_HF_TEXT_READ = {"hf_model_name", "hf_tokenizer_name", "hf_pooler_type", "hf_proj_type", "hf_model_pretrained",
                 "context_length", "tokenizer_kwargs", "output_tokens"}
_HF_TEXT_IGNORED = {"width", "heads", "layers", "vocab_size", "mlp_ratio"}
_HF_TOP = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text", "init_logit_bias", "init_logit_scale"}


def _from_open_clip_hf(model_cfg: Mapping) -> CLIPConfig:
    """An open_clip config with an HFTextEncoder (RoBERTa, XLM-R, NLLB): the transformers model's sizes from
    HF_TEXT_MODELS (no hub here), the image tower as open_clip's other configs give it (OpenAI's ViT, SigLIP's timm
    trunk, another timm tower); open_clip's defaults: pooler mean_pooler, projection mlp."""
    v, t = model_cfg.get("vision_cfg", {}), model_cfg["text_cfg"]
    name, embed_dim = t["hf_model_name"], model_cfg["embed_dim"]
    pooler, proj = t.get("hf_pooler_type", "mean_pooler"), t.get("hf_proj_type", "mlp")
    tokenizer, kwargs = t.get("hf_tokenizer_name"), t.get("tokenizer_kwargs") or {}
    bad = [f"{k}={val!r}" for k, val in model_cfg.items() if k not in _HF_TOP]
    bad += [f"text_cfg.{k}={val!r}" for k, val in t.items() if k not in _HF_TEXT_READ | _HF_TEXT_IGNORED]
    if t.get("output_tokens"):
        bad.append(f"text_cfg.output_tokens={t['output_tokens']!r}")
    if name not in HF_TEXT_MODELS:
        bad.append(f"text_cfg.hf_model_name={name!r} (the transformers models built here: {', '.join(HF_TEXT_MODELS)})")
    bad += [f"text_cfg.hf_pooler_type={pooler!r}"] * (pooler not in HF_POOLERS)
    width = HF_TEXT_MODELS.get(name, {}).get("width")
    # open_clip builds no projection only for a null proj_type on a tower as wide as the embedding.
    bad += [f"text_cfg.hf_proj_type={proj!r}"] * (proj not in ("linear", "mlp") and not (proj is None and
                                                                                         width == embed_dim))
    if tokenizer is None:  # open_clip would tokenize with OpenAI's BPE for a transformers model
        bad.append(f"text_cfg.hf_model_name={name!r} without hf_tokenizer_name")
    elif tokenizer not in HF_TOKENIZERS or HF_TOKENIZERS[tokenizer] != kwargs:
        bad.append(f"text_cfg.hf_tokenizer_name={tokenizer!r} with {kwargs!r}")
    if bad:
        raise UnsupportedArchitectureError(f"open_clip config sets {', '.join(bad)}: not an HFTextEncoder this project "
                                           "builds (hf_model_name, hf_tokenizer_name, hf_pooler_type, hf_proj_type)")
    if not v.get("timm_model_name"):
        vision = from_open_clip({"embed_dim": embed_dim, "quick_gelu": model_cfg.get("quick_gelu", False),
                                 "vision_cfg": v}).vision
    elif (v.get("timm_pool"), v.get("timm_proj")) == ("map", "none"):  # SigLIP's trunk, as its rows build it
        extra = set(v) - {"image_size", "timm_model_name", "timm_pool", "timm_proj"} - _OPEN_CLIP_TRAINING
        if extra or v.get("timm_proj_bias"):
            raise UnsupportedArchitectureError(f"open_clip config sets vision_cfg {sorted(extra)} with SigLIP's "
                                               "attention-pooled timm trunk, which is built here at its defaults")
        vision = _timm_vision(v["timm_model_name"], _square(v.get("image_size", 224), "image_size"))
        if vision.width != embed_dim:
            raise UnsupportedArchitectureError(f"open_clip config: embed_dim {embed_dim} is not the width of its "
                                               f"unprojected image tower ({vision.width})")
    else:
        vision = _timm_head_vision(v)
    text = TextConfig(kind="hf", context_length=int(t.get("context_length", 77)), tokenizer=tokenizer,
                      hf_pooler=pooler, hf_proj=proj or "", **HF_TEXT_MODELS[name])
    bias = model_cfg.get("init_logit_bias")
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, init_logit_bias=None if bias is None else float(bias))


# open_clip's multimodal_cfg keys its CoCa decoder reads (context, sizes), or takes and ignores (mlp_ratio, dim_head,
# n_queries, attn_pooler_heads: MultimodalTransformer is built with MLP ratio 4 and the text tower's vocabulary).
_COCA_DECODER = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "dim_head", "n_queries",
                 "attn_pooler_heads"}


def _from_open_clip_coca(model_cfg: Mapping) -> CLIPConfig:
    """An open_clip CoCa config: its image tower's attentional pooler, its text tower's class embedding and its decoder
    taken off, the rest is an OpenAI-style ViT and text tower (refused, named, where it is not)."""
    v, t, m = dict(model_cfg.get("vision_cfg", {})), dict(model_cfg.get("text_cfg", {})), model_cfg["multimodal_cfg"]
    bad = [f"multimodal_cfg.{k}={val!r}" for k, val in m.items()
           if k not in _COCA_DECODER and not (k == "ls_init_value" and val is None)]
    if v.pop("attentional_pool", False) is not True:
        bad.append("vision_cfg without attentional_pool=true")
    queries, heads = int(v.pop("attn_pooler_queries", 256)), int(v.pop("attn_pooler_heads", 8))
    if v.pop("pool_type", "tok") != "tok" or v.pop("final_ln_after_pool", False):
        bad.append("vision_cfg pooling the attentional pooler's queries other than by the first")
    if t.pop("embed_cls", False) is not True or t.pop("pad_id", 0) != 0:
        bad.append("text_cfg without embed_cls=true and pad_id 0")
    t.pop("pool_type", None)  # the class embedding's position is pooled whatever it says
    for part in (v, t):
        part.pop("output_tokens", None)
    if t.get("no_causal_mask") or t.get("hf_model_name"):
        bad.append("a text tower other than OpenAI's causal one")
    if bad:
        raise UnsupportedArchitectureError(f"open_clip config sets {', '.join(bad)}: a CoCa is built here as "
                                           "open_clip's coca_ViT-* (attentional pooler, class embedding, decoder)")
    rest = {k: val for k, val in model_cfg.items() if k not in ("multimodal_cfg", "custom_text")}
    base = from_open_clip({**rest, "vision_cfg": v, "text_cfg": t})
    if base.vision.kind != "vit":
        raise UnsupportedArchitectureError("open_clip config: a CoCa image tower is built here on OpenAI's ViT only")
    decoder = DecoderConfig(context_length=int(m.get("context_length", 77)), vocab_size=base.text.vocab_size,
                            width=int(m.get("width", 512)), layers=int(m.get("layers", 12)),
                            heads=int(m.get("heads", 8)), activation=base.text.activation)
    if decoder.width != base.embed_dim:  # its cross-attention reads the pooler's embed_dim-wide image tokens
        raise UnsupportedArchitectureError(f"open_clip config: multimodal_cfg.width {decoder.width} is not embed_dim "
                                           f"{base.embed_dim}, the width of the image tokens it attends to")
    vision = replace(base.vision, kind="coca-vit", attn_pool_queries=queries, attn_pool_heads=heads)
    return replace(base, vision=vision, text=replace(base.text, kind="coca"), decoder=decoder)
