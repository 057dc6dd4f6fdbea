"""Which parameters train: whole towers, the last groups of a locked tower, or LayerNorms only.

A tower is a sequence of groups, input side first: the embeddings (with the ViT's ln_pre), one group
per transformer block, the last block together with the final norm (ViT ln_post, OpenAI ln_final, BERT
pooler and ln_final), then the projection. `unlocked` = N keeps the last N groups of a locked tower
trainable; this is how open_clip counts `lock_image_unlocked_groups` / `lock_text_unlocked_layers`.
A ResNet image tower's groups are its stem, its four stages and its attention pool (which projects too). A timm
image tower's are its trunk's as timm's `group_matcher` counts them (the stem, each block or stage, the final norm,
the trunk's own head), as open_clip's `TimmModel.lock` counts them, then open_clip's head (pool, projection), which
open_clip never locks and here is the last group.
"""
from __future__ import annotations

from torch import nn

from nets.modified_resnet import ModifiedResNet
from nets.vision_timm import TimmVisionTower

# The norms whose gains and biases lock_layer_norm=False keeps training in locked groups (timm's LayerNorm2d and
# RMS norms among them; every BatchNorm, FastViT's and MobileCLIP's stems' as well as ResNet's).
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)


def _groups(modules_and_params) -> list[list]:
    return [item if isinstance(item, list) else [item] for item in modules_and_params]


def timm_groups(visual: TimmVisionTower) -> list[list]:
    """The trunk's groups by timm's own `group_matcher` (the regexes timm uses for layer decay and open_clip for
    partial locks), each a list of its parameters, with a norm's module standing for its parameters so that
    lock_layer_norm=False finds it; then the head's parameters, when it has any."""
    from timm.models._manipulate import group_parameters

    trunk = visual.trunk
    groups = []
    for names in group_parameters(trunk, trunk.group_matcher()).values():
        items, seen = [], set()
        for name in names:
            owner = trunk.get_submodule(name.rpartition(".")[0])
            item = owner if isinstance(owner, _NORMS) else trunk.get_parameter(name)
            if id(item) not in seen:
                seen.add(id(item))
                items.append(item)
        groups.append(items)
    head = list(visual.head.parameters())
    return groups + ([head] if head else [])


def vision_groups(visual) -> list[list]:
    if isinstance(visual, TimmVisionTower):
        return timm_groups(visual)
    if isinstance(visual, ModifiedResNet):
        stem = [visual.conv1, visual.bn1, visual.conv2, visual.bn2, visual.conv3, visual.bn3]
        return _groups([stem, *visual.stages, visual.attnpool])
    blocks = list(visual.transformer.resblocks)
    pool = [visual.attn_pool] if hasattr(visual, "attn_pool") else []  # CoCa's pooler, read by ln_post
    return _groups([[visual.conv1, visual.class_embedding, visual.positional_embedding, visual.ln_pre],
                    *blocks[:-1], [blocks[-1], *pool, visual.ln_post], visual.proj])


def text_groups(text) -> list[list]:
    if hasattr(text, "groups"):  # a tower that names its own (nets/text_hf.py's)
        return _groups(text.groups())
    if hasattr(text, "token_embedding"):  # OpenAI's causal tower
        blocks = list(text.transformer.resblocks)
        cls = [text.cls_emb] if hasattr(text, "cls_emb") else []  # CoCa's class embedding, open_clip's embeddings
        return _groups([[text.token_embedding, text.positional_embedding, *cls], *blocks[:-1],
                        [blocks[-1], text.ln_final], text.text_projection])
    bert = text.transformer
    layers = list(bert.encoder.layer)
    last = [layers[-1], text.ln_final] + ([bert.pooler] if bert.pooler is not None else [])
    return _groups([bert.embeddings, *layers[:-1], last, text.text_projection])


def _parameters(item) -> list[nn.Parameter]:
    return list(item.parameters()) if isinstance(item, nn.Module) else [item]


def lock_tower(groups: list[list], unlocked: int, freeze_layer_norm: bool) -> None:
    """Freeze every group but the last `unlocked`; with freeze_layer_norm=False the LayerNorms (a ResNet's
    BatchNorms) of the frozen groups keep training (a few thousand gains and biases that let the locked
    features re-centre)."""
    frozen = groups[:len(groups) - unlocked] if unlocked > 0 else groups
    for group in frozen:
        for item in group:
            for p in _parameters(item):
                p.requires_grad_(False)
            if not freeze_layer_norm and isinstance(item, nn.Module):
                for module in item.modules():
                    if isinstance(module, _NORMS):
                        for p in module.parameters():
                            p.requires_grad_(True)


def apply_locks(model, cfg: dict) -> None:
    """lock_image / lock_text with their unlocked groups, as the settings in train.py describe. A CoCa's caption
    decoder belongs to neither tower and keeps training, as open_clip's locks leave it."""
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg["lock_image"]:
        lock_tower(vision_groups(model.visual), cfg["lock_image_unlocked_groups"], cfg["lock_layer_norm"])
    if cfg["lock_text"]:
        lock_tower(text_groups(model.text), cfg["lock_text_unlocked_layers"], cfg["lock_layer_norm"])


def tower_trains(tower: nn.Module) -> bool:
    return any(p.requires_grad for p in tower.parameters())


def batch_norm_stats_frozen(cfg: dict) -> bool:
    """train.py's freeze_bn_stats, its None resolved: frozen when starting from weights, not from random ones."""
    setting = cfg.get("freeze_bn_stats")
    return bool(cfg.get("model_path")) if setting is None else setting


def freeze_batch_norm_stats(model: nn.Module, frozen: bool) -> int:
    """Put BatchNorm layers in eval mode, so their running statistics stay as they are: all of them when
    `frozen`, else those with no parameter training (a locked group's). Call after `model.train()`. Gains and
    biases that train keep training. Returns how many are held."""
    held = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and \
                (frozen or not any(p.requires_grad for p in module.parameters())):
            module.eval()
            held += 1
    return held


def parameter_summary(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parts = []
    for name in ("visual", "text"):
        tower = getattr(model, name)
        t = sum(p.numel() for p in tower.parameters() if p.requires_grad)
        parts.append(f"{name} {t:,}/{sum(p.numel() for p in tower.parameters()):,}")
    return f"trainable parameters: {trainable:,} / {total:,} ({100 * trainable / total:.2f}%; {', '.join(parts)})"
