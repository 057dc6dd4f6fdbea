"""A bare state dict's architecture: the sizes read from its tensor shapes, then matched to the model table for
what shapes do not show (head counts, the activation, SigLIP's and CoCa's rows)."""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Mapping

import torch

from utils.errors import UserError

from .configs import (COCA, MODEL_CONFIGS, SIGLIP, CLIPConfig, TextConfig, VisionConfig, get_config, mlp_ratio_of,
                      tower_key)


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
    key = tower_key(shapes, heads=False, activation=False)
    towers = {tower_key(getattr(get_config(phi), part)): getattr(get_config(phi), part) for phi in MODEL_CONFIGS}
    found = {t.heads: t for t in towers.values() if tower_key(t, heads=False, activation=False) == key}
    if len(found) != 1:
        what = "image" if part == "vision" else "text"
        sizes = f"width {shapes.width}, {shapes.layers} layers"
        raise UnknownHeadsError(
            f"the {what} tower's tensor shapes ({sizes}) match no phi in the table, so its number of attention "
            "heads is unknown (shapes do not show it); pass the phi it was trained as, or record its architecture "
            "beside the file (README, 'Models')")
    tower = next(iter(found.values()))
    return replace(shapes, heads=tower.heads, mlp_ratio=tower.mlp_ratio)  # the table's ratio: 4.9231, not 8192/1664


_SIGLIP_PATCHES = "visual.trunk.patch_embed.proj.weight"


def _siglip_shapes(sd: Mapping) -> tuple:
    """What a SigLIP state dict's shapes show: every size, the image size (its grid) and the vocabulary."""
    def shape(key: str):
        return tuple(sd[key].shape) if key in sd else None

    return (shape(_SIGLIP_PATCHES), shape("visual.trunk.pos_embed"), shape("visual.trunk.blocks.0.mlp.fc1.weight"),
            _count_layers(sd, r"visual\.trunk\.blocks\.(\d+)\."), shape("text.token_embedding.weight"),
            shape("text.positional_embedding"), shape("text.transformer.resblocks.0.mlp.c_fc.weight"),
            _count_layers(sd, r"text\.transformer\.resblocks\.(\d+)\."), shape("text.text_projection.weight"),
            shape("text.text_projection.bias"))


def _siglip_row_shapes(config: CLIPConfig) -> tuple:
    """`_siglip_shapes` of the network a SigLIP row builds (timm's trunk has no class token: grid x grid positions)."""
    v, t = config.vision, config.text
    grid = v.image_size // v.patch_size
    return ((v.width, 3, v.patch_size, v.patch_size), (1, grid * grid, v.width), (v.mlp_width, v.width), v.layers,
            (t.vocab_size, t.width), (t.context_length, t.width), (t.mlp_width, t.width), t.layers,
            (config.embed_dim, t.width) if t.projection else None, (config.embed_dim,) if t.proj_bias else None)


def _siglip_of_shapes(sd: Mapping) -> CLIPConfig:
    """The SigLIP row whose network has these shapes: the row knows what shapes do not show (heads, activations,
    the timm model), and SigLIP's rows differ in their shapes (image size, vocabulary, sizes)."""
    wanted = _siglip_shapes(sd)
    found = [phi for phi in SIGLIP if _siglip_row_shapes(get_config(phi)) == wanted]
    if len(found) == 1:
        return get_config(found[0])
    if found:  # SO400M-14 at 378 and 384 px: one 27 x 27 grid, one network, two input sizes
        raise UnknownHeadsError(f"a SigLIP state dict whose shapes fit {' and '.join(found)}, which differ only in "
                                "the image size they take; pass the phi it was trained as")
    raise UnknownHeadsError("a SigLIP state dict (timm image trunk) whose shapes match no SigLIP row of the table: "
                            "shapes do not show its heads, activations or timm model; keep open_clip_config.json "
                            "beside it, or record its architecture beside the file (README, 'Models')")


def _coca_shapes(sd: Mapping) -> tuple:
    def shape(key: str):
        return tuple(sd[key].shape) if key in sd else None

    return (shape("visual.conv1.weight"), shape("visual.positional_embedding"), shape("visual.attn_pool.query"),
            _count_layers(sd, r"visual\.transformer\.resblocks\.(\d+)\."), shape("text.token_embedding.weight"),
            shape("text.positional_embedding"), _count_layers(sd, r"text\.transformer\.resblocks\.(\d+)\."),
            shape("text.text_projection"), shape("text_decoder.text_projection"),
            _count_layers(sd, r"text_decoder\.resblocks\.(\d+)\."))


def _coca_of_shapes(sd: Mapping) -> CLIPConfig:
    """The CoCa row whose network has these shapes (the row knows the heads, which no shape shows)."""
    def row_shapes(c: CLIPConfig) -> tuple:
        v, t, d = c.vision, c.text, c.decoder
        grid = v.image_size // v.patch_size
        return ((v.width, 3, v.patch_size, v.patch_size), (grid * grid + 1, v.width),
                (v.attn_pool_queries, c.embed_dim), v.layers, (t.vocab_size, t.width), (t.context_length + 1, t.width),
                t.layers, (t.width, c.embed_dim), (d.width, d.vocab_size), d.layers)

    found = [phi for phi in COCA if row_shapes(get_config(phi)) == _coca_shapes(sd)]
    if not found:
        raise UnknownHeadsError("a CoCa state dict (text.cls_emb) whose shapes match no CoCa row of the table: shapes "
                                "do not show its heads; keep open_clip_config.json beside it, or pass the phi")
    return get_config(found[0])


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> CLIPConfig:
    """The architecture of a state dict in OpenAI's key layout, from its tensor shapes and the table.

    Shapes give every size but not the head counts, which come from the table row whose tower has the same
    shapes (`UnknownHeadsError` when none has), nor the activation: the result uses OpenAI's QuickGELU, which
    the original repo's and OpenAI's files need; `with_activation` makes the GELU twin.
    """
    sd = state_dict
    if "text.cls_emb" in sd:
        return _coca_of_shapes(sd)
    if any(k.startswith("text.transformer.") and not k.startswith("text.transformer.resblocks.") for k in sd):
        raise UnknownHeadsError("a state dict with a transformers text tower (text.transformer.*, open_clip's "
                                "HFTextEncoder): shapes do not show its model, pooler or tokenizer; pass the phi it was "
                                "trained as, or keep open_clip_config.json beside it")
    if _SIGLIP_PATCHES in sd:
        return _siglip_of_shapes(sd)
    if any(k.startswith("visual.trunk.") for k in sd):  # ConvNeXt, ...: the timm model is in no shape
        raise UnknownHeadsError("a state dict with a timm image trunk (visual.trunk.*) that is not SigLIP's: shapes do "
                                "not show its timm model; pass the phi it was trained as, or keep "
                                "open_clip_config.json beside it")
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
