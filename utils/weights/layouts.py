"""Maps every supported checkpoint layout onto OpenAI's state-dict key names, and back to `transformers`.

Layouts: OpenAI's own (original repo `.pth`, OpenAI TorchScript, open_clip, this project's outputs),
`transformers` CLIPModel, ChineseCLIPModel, MetaClip2Model and AltCLIPModel; `transformers` SiglipModel onto
open_clip's SigLIP keys (`visual.trunk.*`, timm's, and `text.*`), which are this project's for SigLIP. Containers
(`{"state_dict": ...}`, `{"model": ...}`) and the `module.` / `_orig_mod.` prefixes of DDP and torch.compile are
unwrapped first.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Mapping

import torch

from nets.configs import ACTIVATIONS, UnsupportedArchitectureError

# (transformers prefix, OpenAI prefix); per-block names below apply inside the `layers.N.` prefixes.
_CLIP_PREFIXES = [
    ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
    ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight"),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
    ("vision_model.pre_layrnorm.", "visual.ln_pre."),
    ("vision_model.post_layernorm.", "visual.ln_post."),
    ("visual_projection.weight", "visual.proj"),
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.final_layer_norm.", "ln_final."),
    ("text_projection.weight", "text_projection"),
    ("logit_scale", "logit_scale"),
]
# ChineseCLIP's text model is a BertModel, whose keys this project keeps as they are under `transformer.`.
_BERT_PREFIX = ("text_model.", "transformer.")
# AltCLIP's text model: its XLM-R body as XLMRobertaModel names it under `transformer.`, its pre_LN and
# transformation as they are; the image tower and projections are CLIPModel's. Its files say `layer.N` in both
# towers (the hub's names, which transformers 5 still writes, and export_hf writes): (AltCLIP's, CLIPModel's / ours).
_ALTCLIP_KEYS = [("text_model.roberta.", "transformer."), ("text_model.pre_LN.", "pre_LN."),
                 ("text_model.transformation.", "transformation."),
                 ("vision_model.encoder.layer.", "vision_model.encoder.layers.")]
# Its modules' `layers.N` (transformers 5), read too; the image tower's already are CLIPModel's.
_ALTCLIP_READ_ALSO = [("text_model.roberta.encoder.layers.", "transformer.encoder.layer.")]
_BLOCK_NAMES = [
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
]
# transformers stores these as nn.Linear weights (out, in); OpenAI as matrices applied on the right.
_TRANSPOSED = {"visual.proj", "text_projection"}
_QKV = re.compile(r"(.*\.)self_attn\.([qkv])_proj\.(weight|bias)$")
_FUSED_QKV = re.compile(r"(.*\.)attn\.in_proj_(weight|bias)$")
# Buffers some writers saved that carry no learned state.
_NOT_WEIGHTS = re.compile(r"(^|\.)(position_ids|attn_mask)$|^(input_resolution|context_length|vocab_size)$")


def unwrap(checkpoint: Mapping) -> Mapping[str, torch.Tensor]:
    """The state dict inside a checkpoint container, without DDP / torch.compile prefixes."""
    for key in ("state_dict", "model"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    out = {}
    for key, value in checkpoint.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    if "vision_model.head.probe" in state_dict or "text_model.head.weight" in state_dict:
        return "transformers-siglip"
    if "text_model.embeddings.word_embeddings.weight" in state_dict:
        return "transformers-chinese-clip"
    if "text_model.roberta.embeddings.word_embeddings.weight" in state_dict:
        return "transformers-altclip"
    if any(k.startswith("vision_model.") for k in state_dict):
        return "transformers-clip"
    return "openai"


def _swap(key: str, prefixes: list[tuple[str, str]]) -> str:
    """`key` with the first matching (old, new) prefix replaced; as it is where none matches."""
    return next((new + key[len(old):] for old, new in prefixes if key.startswith(old)), key)


def _is_stack(prefix: str) -> bool:
    return prefix.endswith(("layers.", "resblocks.", "blocks."))


def _rename_stack(layer_prefix: str, prefixes: list[tuple[str, str]]) -> str | None:
    """'visual.transformer.resblocks.3.' <-> 'vision_model.encoder.layers.3.'"""
    return next((new + layer_prefix[len(old):] for old, new in prefixes
                 if _is_stack(old) and layer_prefix.startswith(old)), None)


def _rename(key: str, prefixes: list[tuple[str, str]], block_names: list[tuple[str, str]]) -> str | None:
    for old, new in prefixes:
        if key.startswith(old):
            if not _is_stack(old):
                return new + key[len(old):]
            layer, _, name = key[len(old):].partition(".")
            return next((f"{new}{layer}.{b_new}{name[len(b_old):]}"
                         for b_old, b_new in block_names if name.startswith(b_old)), None)
    return None


def to_openai(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict with OpenAI key names, name of the layout it came in)."""
    layout = detect_layout(state_dict)
    weights = {k: v for k, v in state_dict.items() if not _NOT_WEIGHTS.search(k)}
    if layout == "openai":
        return weights, layout
    if layout == "transformers-siglip":
        return siglip_to_open_clip(weights), layout
    if layout == "transformers-altclip":
        weights = {_swap(k, _ALTCLIP_READ_ALSO + _ALTCLIP_KEYS): v for k, v in weights.items()}
    prefixes = _CLIP_PREFIXES + ([_BERT_PREFIX] if layout == "transformers-chinese-clip" else [])
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        if (m := _QKV.match(key)) and (layer := _rename_stack(m.group(1), prefixes)):
            qkv.setdefault(f"{layer}attn.in_proj_{m.group(3)}", {})[m.group(2)] = value
            continue
        new = _rename(key, prefixes, _BLOCK_NAMES)
        if new is None:
            out[key] = value  # left as is, so the mismatch report names it
        else:
            out[new] = value.t() if new in _TRANSPOSED else value
    for fused, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"checkpoint has only the {sorted(parts)} projections of {fused}")
        out[fused] = torch.cat([parts[p] for p in "qkv"])  # OpenAI fuses q, k, v in this order
    return out, layout


def openai_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI layout -> `transformers` CLIPModel / MetaClip2Model keys (the same names), ChineseCLIPModel's (those
    with a BERT tower) or AltCLIPModel's (an XLM-R tower, `pre_LN` after it)."""
    if "pre_LN.weight" in state_dict:
        # The inverse of to_openai's AltCLIP renames: the text tower's keys straight, the rest as CLIPModel's with
        # the image stack then named as AltCLIP's files name it.
        inverse = [(ours, theirs) for theirs, ours in _ALTCLIP_KEYS]
        text = [k for k in state_dict if _swap(k, inverse) != k]
        rest = openai_to_transformers({k: v for k, v in state_dict.items() if k not in text})
        return {**{_swap(k, inverse): state_dict[k] for k in text}, **{_swap(k, inverse): v for k, v in rest.items()}}
    bert = "transformer.embeddings.word_embeddings.weight" in state_dict
    inverse = [(new, old) for old, new in _CLIP_PREFIXES] + ([_BERT_PREFIX[::-1]] if bert else [])
    block_names = [(new, old) for old, new in _BLOCK_NAMES]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if m := _FUSED_QKV.match(key):
            layer = _rename_stack(m.group(1), inverse)
            for name, part in zip("qkv", value.chunk(3)):
                out[f"{layer}self_attn.{name}_proj.{m.group(2)}"] = part
            continue
        new = _rename(key, inverse, block_names)
        if new is None:
            raise KeyError(f"no transformers name for {key}")
        out[new] = value.t() if key in _TRANSPOSED else value
    return out


def is_metaclip2(text) -> bool:
    """Whether a text tower is MetaClip2Model's (the inverse of `_metaclip2_text`): OpenAI's causal one pooling the
    first `</s>` of a tokenizer its folders are read with."""
    return text.kind == "openai" and text.causal and text.pool == "eos" and bool(text.tokenizer) and \
        _METACLIP2_TOKENIZERS.get(text.eos_id) == text.tokenizer


def transformers_config(config, bos_token_id: int | None = None, pad_token_id: int | None = None):
    """The `transformers` CLIPConfig of a model in this repo's table: ChineseCLIPConfig for BERT towers,
    AltCLIPConfig for AltCLIP's, MetaClip2Config for MetaCLIP 2's (its tokenizer's start and pad ids, which shape
    no tensor)."""
    import transformers

    v, t = config.vision, config.text
    vision = dict(hidden_size=v.width, intermediate_size=v.mlp_width, num_hidden_layers=v.layers,
                  num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                  hidden_act=v.activation)
    if t.is_bert:
        from nets.text_bert import bert_config

        return transformers.ChineseCLIPConfig(text_config=bert_config(t).to_dict(), vision_config=vision,
                                              projection_dim=config.embed_dim)
    if t.kind == "altclip":  # the inverse of _altclip_text
        from nets.text_altclip import xlmr_config

        return transformers.AltCLIPConfig(text_config={**xlmr_config(t).to_dict(), "project_dim": t.project_dim},
                                          vision_config=vision, projection_dim=config.embed_dim)
    if is_metaclip2(t):  # the inverse of _metaclip2_text
        text = dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_width,
                    num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.context_length,
                    hidden_act=t.activation, layer_norm_eps=t.eps, eos_token_id=t.eos_id, bos_token_id=bos_token_id,
                    pad_token_id=pad_token_id, projection_dim=config.embed_dim)
        return transformers.MetaClip2Config(text_config=text, vision_config=vision, projection_dim=config.embed_dim)
    # EOT is the largest id, so transformers' first-EOS pooling picks the same token as OpenAI's argmax.
    text = dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_width,
                num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.context_length,
                hidden_act=t.activation, bos_token_id=t.vocab_size - 2, eos_token_id=t.vocab_size - 1)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=config.embed_dim)


def _activation(act: str, where: str) -> str:
    if act not in ACTIVATIONS:
        raise UnsupportedArchitectureError(f"{where}.hidden_act is {act!r}; the towers here build "
                                           f"{' or '.join(ACTIVATIONS)} exactly")
    return act


def _check_layer_norm(eps: float, expected: float, where: str) -> None:
    if abs(eps - expected) > expected * 1e-6:
        raise UnsupportedArchitectureError(f"{where}.layer_norm_eps is {eps}; the towers here use {expected}")


def config_from_transformers(config_json: Mapping):
    """The inverse of `transformers_config`: this repo's config of a `transformers` CLIPModel / ChineseCLIPModel
    `config.json`, its head counts, MLP widths and activations as the file says (transformers fills what it omits)."""
    import transformers

    from nets.configs import CLIPConfig, TextConfig, VisionConfig, mlp_ratio_of

    model_type = config_json.get("model_type")
    if model_type == "siglip":
        return siglip_config_from_transformers(config_json)
    if model_type == "siglip2":
        raise UnsupportedArchitectureError(
            "model_type 'siglip2' is transformers' NaFlex Siglip2Model: it patches each image at its own resolution "
            "and aspect ratio (variable-length patch sequences, resized position embeddings), which the fixed-grid "
            "towers here do not compute; use a fixed-resolution SigLIP 2 folder (model_type 'siglip', such as "
            "google/siglip2-base-patch16-224) or open_clip's (--phi ViT-B-16-SigLIP2 --model_path webli)")
    classes = {"clip": transformers.CLIPConfig, "chinese_clip": transformers.ChineseCLIPConfig,
               "metaclip_2": transformers.MetaClip2Config, "altclip": transformers.AltCLIPConfig}
    if model_type not in classes:
        raise UnsupportedArchitectureError(f"model_type {model_type!r}: only transformers' CLIPModel ('clip'), "
                                           "ChineseCLIPModel ('chinese_clip'), MetaClip2Model ('metaclip_2'), "
                                           "AltCLIPModel ('altclip') and SiglipModel ('siglip') have the towers "
                                           "built here")
    full = classes[model_type].from_dict(dict(config_json))
    v, t = full.vision_config, full.text_config
    _check_layer_norm(v.layer_norm_eps, 1e-5, "vision_config")
    vision = VisionConfig(image_size=v.image_size, patch_size=v.patch_size, width=v.hidden_size,
                          layers=v.num_hidden_layers, heads=v.num_attention_heads,
                          mlp_ratio=mlp_ratio_of(v.hidden_size, v.intermediate_size),
                          activation=_activation(v.hidden_act, "vision_config"))
    if model_type == "chinese_clip":
        from nets.text_bert import bert_config

        # Chinese-CLIP's tokenizer pads to 52; the BERT tower itself is transformers' own, so its settings must
        # be the ones the tower here passes to BertModel.
        text = TextConfig(kind="bert-cls", context_length=52, vocab_size=t.vocab_size, width=t.hidden_size,
                          layers=t.num_hidden_layers, heads=t.num_attention_heads,
                          intermediate_size=t.intermediate_size, max_position_embeddings=t.max_position_embeddings,
                          type_vocab_size=t.type_vocab_size)
        ours = bert_config(text)
        for name in ("hidden_act", "layer_norm_eps", "position_embedding_type"):
            if getattr(t, name, None) != getattr(ours, name, None):
                raise UnsupportedArchitectureError(f"text_config.{name} is {getattr(t, name, None)!r}; the BERT "
                                                   f"tower here uses {getattr(ours, name, None)!r}")
    elif model_type in _MULTILINGUAL:
        text = _MULTILINGUAL[model_type](t)
    else:
        _check_layer_norm(t.layer_norm_eps, 1e-5, "text_config")
        # transformers pools the first EOS token (the argmax for its legacy id 2); OpenAI's tower pools the argmax.
        if t.eos_token_id not in (2, t.vocab_size - 1):
            raise UnsupportedArchitectureError(f"text_config.eos_token_id is {t.eos_token_id}: the text tower here "
                                               "pools the largest token id (OpenAI's EOT, the last of the vocabulary)")
        text = TextConfig(kind="openai", context_length=t.max_position_embeddings, vocab_size=t.vocab_size,
                          width=t.hidden_size, layers=t.num_hidden_layers, heads=t.num_attention_heads,
                          mlp_ratio=mlp_ratio_of(t.hidden_size, t.intermediate_size),
                          activation=_activation(t.hidden_act, "text_config"))
    return CLIPConfig(embed_dim=full.projection_dim, vision=vision, text=text)


# MetaClip2Model's tokenizer by its end id: XLM-V's (the worldwide folders, </s> 2), read from the folder's files.
# transformers pools the first text_config.eos_token_id, as open_clip's eos pooling does.
_METACLIP2_TOKENIZERS = {2: "facebook/xlm-v-base"}


def _metaclip2_text(t):
    """MetaClip2Model's text tower: OpenAI's causal one, pooling the first `</s>` of XLM-V's ids."""
    from nets.configs import TextConfig, mlp_ratio_of

    _check_layer_norm(t.layer_norm_eps, 1e-5, "text_config")
    if t.eos_token_id not in _METACLIP2_TOKENIZERS:
        raise UnsupportedArchitectureError(
            f"text_config.eos_token_id is {t.eos_token_id}: the MetaClip2Model folders read here are the XLM-V "
            "ones (</s> 2, the worldwide models); mT5's (</s> 1) are not built yet")
    return TextConfig(kind="openai", context_length=t.max_position_embeddings, vocab_size=t.vocab_size,
                      width=t.hidden_size, layers=t.num_hidden_layers, heads=t.num_attention_heads,
                      mlp_ratio=mlp_ratio_of(t.hidden_size, t.intermediate_size),
                      activation=_activation(t.hidden_act, "text_config"), pool="eos", eos_id=t.eos_token_id,
                      tokenizer=_METACLIP2_TOKENIZERS[t.eos_token_id])


def _altclip_text(t):
    """AltCLIPModel's text tower (XLM-R, pre_LN, transformation, [CLS]) with XLM-R's tokenizer from the folder;
    captions up to the positions XLM-R has (they count from <pad> + 1), as transformers takes them."""
    from nets.configs import TextConfig
    from nets.text_altclip import PAD_TOKEN_ID

    if t.pad_token_id != PAD_TOKEN_ID or getattr(t, "position_embedding_type", "absolute") != "absolute":
        raise UnsupportedArchitectureError(f"text_config: pad_token_id {t.pad_token_id}, position_embedding_type "
                                           f"{getattr(t, 'position_embedding_type', None)!r}; the XLM-R tower here "
                                           f"pads with {PAD_TOKEN_ID} and has absolute positions")
    return TextConfig(kind="altclip", context_length=t.max_position_embeddings - PAD_TOKEN_ID - 1,
                      vocab_size=t.vocab_size, width=t.hidden_size, layers=t.num_hidden_layers,
                      heads=t.num_attention_heads, activation=t.hidden_act, intermediate_size=t.intermediate_size,
                      max_position_embeddings=t.max_position_embeddings, type_vocab_size=t.type_vocab_size,
                      tokenizer="xlm-roberta-large", eps=float(t.layer_norm_eps), project_dim=t.project_dim)


_MULTILINGUAL = {"metaclip_2": _metaclip2_text, "altclip": _altclip_text}


# transformers SiglipModel -> open_clip's SigLIP keys: (transformers prefix, open_clip prefix), first match wins.
_SIGLIP_PREFIXES = [
    ("vision_model.embeddings.patch_embedding.", "visual.trunk.patch_embed.proj."),
    ("vision_model.embeddings.position_embedding.weight", "visual.trunk.pos_embed"),
    ("vision_model.encoder.layers.", "visual.trunk.blocks."),
    ("vision_model.post_layernorm.", "visual.trunk.norm."),
    ("vision_model.head.probe", "visual.trunk.attn_pool.latent"),
    ("vision_model.head.attention.out_proj.", "visual.trunk.attn_pool.proj."),
    ("vision_model.head.layernorm.", "visual.trunk.attn_pool.norm."),
    ("vision_model.head.mlp.", "visual.trunk.attn_pool.mlp."),
    ("text_model.embeddings.token_embedding.weight", "text.token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "text.positional_embedding"),
    ("text_model.encoder.layers.", "text.transformer.resblocks."),
    ("text_model.final_layer_norm.", "text.ln_final."),
    ("text_model.head.", "text.text_projection."),
    ("logit_scale", "logit_scale"),
    ("logit_bias", "logit_bias"),
]
# Per-block names: timm's (image trunk) and this project's Transformer (text tower), after the layer number.
_TIMM_BLOCK_NAMES = [("self_attn.out_proj.", "attn.proj."), ("layer_norm1.", "norm1."), ("layer_norm2.", "norm2."),
                     ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2.")]
_SIGLIP_QKV = re.compile(r"(vision_model\.encoder\.layers\.|text_model\.encoder\.layers\.)(\d+)\.self_attn\.([qkv])_proj\."
                         r"(weight|bias)$")
_POOL_IN_PROJ = re.compile(r"vision_model\.head\.attention\.in_proj_(weight|bias)$")


def siglip_to_open_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers SiglipModel keys -> open_clip's (timm's trunk, open_clip's text tower): q, k, v fused as timm's
    `qkv` and `in_proj`; the pool's packed q/k/v split as timm's `q` and `kv`; positions and scalars reshaped."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if m := _SIGLIP_QKV.match(key):
            vision = m.group(1).startswith("vision")
            fused = (f"visual.trunk.blocks.{m.group(2)}.attn.qkv.{m.group(4)}" if vision else
                     f"text.transformer.resblocks.{m.group(2)}.attn.in_proj_{m.group(4)}")
            qkv.setdefault(fused, {})[m.group(3)] = value
            continue
        if m := _POOL_IN_PROJ.match(key):
            q, k, v = value.chunk(3)  # nn.MultiheadAttention packs q, k, v; timm's pool keeps q apart, k and v as kv
            out[f"visual.trunk.attn_pool.q.{m.group(1)}"] = q
            out[f"visual.trunk.attn_pool.kv.{m.group(1)}"] = torch.cat([k, v])
            continue
        new = _rename(key, _SIGLIP_PREFIXES, _TIMM_BLOCK_NAMES if key.startswith("vision_model.") else _BLOCK_NAMES)
        if new is None:
            out[key] = value  # left as is, so the mismatch report names it
        elif new == "visual.trunk.pos_embed":
            out[new] = value.unsqueeze(0)  # (positions, width) -> timm's (1, positions, width)
        elif new in ("logit_scale", "logit_bias"):
            out[new] = value.reshape(())  # transformers' (1,) -> open_clip's scalar
        else:
            out[new] = value
    for fused, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"checkpoint has only the {sorted(parts)} projections of {fused}")
        out[fused] = torch.cat([parts[p] for p in "qkv"])
    return out


def open_clip_to_siglip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `siglip_to_open_clip`: open_clip's SigLIP keys -> transformers SiglipModel's."""
    inverse = [(new, old) for old, new in _SIGLIP_PREFIXES]
    out: dict[str, torch.Tensor] = {}
    pool: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if m := re.match(r"visual\.trunk\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key):
            for name, part in zip("qkv", value.chunk(3)):
                out[f"vision_model.encoder.layers.{m.group(1)}.self_attn.{name}_proj.{m.group(2)}"] = part
            continue
        if m := re.match(r"text\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key):
            for name, part in zip("qkv", value.chunk(3)):
                out[f"text_model.encoder.layers.{m.group(1)}.self_attn.{name}_proj.{m.group(2)}"] = part
            continue
        if m := re.match(r"visual\.trunk\.attn_pool\.(q|kv)\.(weight|bias)$", key):
            pool.setdefault(m.group(2), {})[m.group(1)] = value
            continue
        new = _rename(key, inverse, [(b, a) for a, b in (_TIMM_BLOCK_NAMES if key.startswith("visual.")
                                                         else _BLOCK_NAMES)])
        if new is None:
            raise KeyError(f"no transformers SiglipModel name for {key}")
        if key == "visual.trunk.pos_embed":
            value = value.squeeze(0)
        elif key in ("logit_scale", "logit_bias"):
            value = value.reshape(1)
        out[new] = value
    for name, parts in pool.items():
        out[f"vision_model.head.attention.in_proj_{name}"] = torch.cat([parts["q"], parts["kv"]])
    return out


# transformers' activation names -> the towers' (SigLIP's checkpoints on the hub say gelu_pytorch_tanh, as big_vision
# trained them; open_clip's timm trunk and SigLIP 1 text tower use exact GELU instead).
_SIGLIP_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# A timm entry point of SigLIP's ViT (no class token, attention-pool head); the folder's sizes are passed to it.
_SIGLIP_TIMM_FAMILY = "vit_base_patch16_siglip_224"


def _siglip_activation(act: str, where: str) -> str:
    if act not in _SIGLIP_ACTIVATIONS:
        raise UnsupportedArchitectureError(f"{where}.hidden_act is {act!r}; SigLIP's towers here build "
                                           f"{' or '.join(_SIGLIP_ACTIVATIONS)} exactly")
    return _SIGLIP_ACTIVATIONS[act]


def siglip_config_from_transformers(config_json: Mapping):
    """This repo's config of a transformers SiglipModel `config.json`: timm's SigLIP trunk and the SigLIP text
    tower at its sizes and activations; the phi of the table row with the same network where there is one (the
    hub's folders say tanh GELU where open_clip's rows build exact GELU, so those are rows of their own)."""
    import transformers

    from nets.configs import SIGLIP, CLIPConfig, TextConfig, VisionConfig, mlp_ratio_of

    full = transformers.SiglipConfig.from_dict(dict(config_json))
    v, t = full.vision_config, full.text_config
    if not getattr(v, "vision_use_head", True):
        raise UnsupportedArchitectureError("vision_config.vision_use_head is false: an image tower without its "
                                           "attention-pool head gives no image embedding")
    if getattr(v, "num_channels", 3) != 3:
        raise UnsupportedArchitectureError(f"vision_config.num_channels is {v.num_channels}; the towers take RGB")
    _check_layer_norm(v.layer_norm_eps, 1e-6, "vision_config")  # timm's SigLIP trunk: 1e-6
    projection = getattr(t, "projection_size", None) or t.hidden_size
    if projection != v.hidden_size:
        raise UnsupportedArchitectureError(f"text_config.projection_size {projection} is not the image width "
                                           f"{v.hidden_size}, the embedding SigLIP's unprojected image tower gives")
    vision = VisionConfig(kind="timm", timm_model_name=_SIGLIP_TIMM_FAMILY, image_size=v.image_size,
                          patch_size=v.patch_size, width=v.hidden_size, layers=v.num_hidden_layers,
                          heads=v.num_attention_heads, mlp_ratio=mlp_ratio_of(v.hidden_size, v.intermediate_size),
                          activation=_siglip_activation(v.hidden_act, "vision_config"))
    text = TextConfig(kind="siglip", context_length=t.max_position_embeddings, vocab_size=t.vocab_size,
                      width=t.hidden_size, layers=t.num_hidden_layers, heads=t.num_attention_heads,
                      mlp_ratio=mlp_ratio_of(t.hidden_size, t.intermediate_size),
                      activation=_siglip_activation(t.hidden_act, "text_config"), eps=float(t.layer_norm_eps),
                      proj_bias=True)
    config = CLIPConfig(embed_dim=v.hidden_size, vision=vision, text=text, init_logit_bias=-10.0)
    # The table's timm name for the same network, so phi_of finds its row (timm names differ only in defaults that
    # the sizes above override).
    for row in SIGLIP.values():
        if _trunk_sizes(row.vision) == _trunk_sizes(vision):
            return replace(config, vision=replace(vision, timm_model_name=row.vision.timm_model_name))
    return config


def _trunk_sizes(vision) -> tuple:
    return vision.image_size, vision.patch_size, vision.width, vision.layers, vision.heads, vision.mlp_width


_SIGLIP_ACTIVATION_NAMES = {ours: theirs for theirs, ours in _SIGLIP_ACTIVATIONS.items()}


def siglip_transformers_config(config, pad_token_id: int, eos_token_id: int | None):
    """The transformers SiglipConfig of a SigLIP model in this repo (the inverse of
    `siglip_config_from_transformers`); the tokenizer's pad and end ids, which shape no tensor."""
    import transformers

    v, t = config.vision, config.text
    vision = dict(hidden_size=v.width, intermediate_size=v.mlp_width, num_hidden_layers=v.layers,
                  num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                  hidden_act=_SIGLIP_ACTIVATION_NAMES[v.activation], layer_norm_eps=1e-6)
    text = dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_width,
                num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.context_length,
                hidden_act=_SIGLIP_ACTIVATION_NAMES[t.activation], layer_norm_eps=t.eps,
                projection_size=config.embed_dim, pad_token_id=pad_token_id, bos_token_id=None,
                eos_token_id=eos_token_id)
    return transformers.SiglipConfig(text_config=text, vision_config=vision)


def siglip_head(state_dict: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """`state_dict` with the text projection transformers' head always has: an identity without bias where the
    tower has none (the i18n SO400M: its width is the embedding), a zero bias where the projection has none."""
    out = dict(state_dict)
    width = config.text.width
    weight = out.setdefault("text.text_projection.weight", torch.eye(width))
    out.setdefault("text.text_projection.bias", torch.zeros(weight.shape[0]))
    return out
