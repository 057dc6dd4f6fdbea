"""LoRA adapters (the `peft` package) on the towers' attention and MLP projections, and merging them back.

The adapted model trains with its original weights frozen; every saved weight file is merged back
(W + B A * alpha / r) into plain OpenAI keys, so it loads anywhere a fine-tuned CLIP loads. The adapter
alone is saved too, as peft writes it (`adapter_model.safetensors` + `adapter_config.json`).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from utils.errors import UserError
from utils.files import atomic_write_bytes

# What "attn" and "mlp" name in each tower: OpenAI blocks keep q, k and v in one `attn.in_proj_weight`
# parameter (OpenAI's key name, so it is not a Linear module); BERT has a Linear for each.
_ALIASES = {
    "openai": {"attn": ("attn.in_proj_weight", "attn.out_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")},
    "bert": {"attn": ("attention.self.query", "attention.self.key", "attention.self.value",
                      "attention.output.dense"),
             "mlp": ("intermediate.dense", "output.dense")},
    # transformers' M2M100 encoder (NLLB's hf text tower); RoBERTa and XLM-R are named as BERT is.
    "m2m_100": {"attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
                "mlp": ("fc1", "fc2")},
    # A ResNet image tower's only attention and Linear layers are its attention pool's; its convolutions get none.
    "resnet": {"attn": ("attnpool.q_proj", "attnpool.k_proj", "attnpool.v_proj", "attnpool.c_proj"), "mlp": ()},
}
ADAPTER_NAME = "default"
# timm trunks: the Linear layers directly inside a module whose class name says what it is (timm's `Attention`,
# `EvaAttention`, FastViT's attention mixer, an `AttentionPoolLatent`'s q, kv, proj; `Mlp`, `SwiGluMlp`, `GluMlp`,
# ViTamin's `GeGluMlp`), so that blocks named `attn`, `token_mixer` or `attn_pool` are all found. open_clip's head (the
# projection) is outside the trunk. A ConvNeXt has no attention; FastViT's early stages (RepMixer) have none either.
_TIMM_OWNERS = {"attn": ("attention",), "mlp": ("mlp", "glu")}


def _kind(model, tower_name: str) -> str:
    if tower_name == "text_decoder":  # CoCa's: OpenAI blocks, and cross-attention whose q/k/v is in_proj_weight
        return "openai"
    if tower_name == "text":
        text = model.config.text
        if text.kind == "hf":
            return "m2m_100" if text.hf_family == "m2m_100" else "bert"
        return "bert" if text.is_bert else "openai"
    kind = model.config.vision.kind
    return kind if kind in ("resnet", "timm") else "openai"


def _timm_layers(tower: nn.Module, owners: tuple[str, ...]) -> frozenset[str]:
    """Names of the Linear layers directly inside the trunk's modules whose class name holds one of `owners`."""
    found = set()
    for name, module in tower.trunk.named_modules(prefix="trunk"):
        if any(o in type(module).__name__.lower() for o in owners):
            found.update(f"{name}.{child}" for child, m in module.named_children() if isinstance(m, nn.Linear))
    return frozenset(found)


def _ends_with(name: str, suffixes) -> bool:
    if isinstance(suffixes, frozenset):
        return name in suffixes
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _tower_title(model, tower_name: str) -> str:
    if tower_name == "text_decoder":
        return "caption decoder"
    if tower_name == "text":
        return "text tower"
    vision = model.config.vision
    return f"image tower ({vision.timm_model_name or vision.kind})"


def _call_fused_qkv_layers(model: nn.Module) -> int:
    """timm's EVA01 attention (q and v biases) computes `F.linear(x, self.qkv.weight, bias)` and so never calls its
    qkv layer, where the adapter sits; its `qkv_bias_separate` path calls the layer, then adds the same bias (equal
    features: the layer has no bias of its own). Returns how many were switched."""
    switched = 0
    for module in model.modules():
        if isinstance(getattr(module, "qkv", None), nn.Linear) and getattr(module, "q_bias", None) is not None \
                and getattr(module, "qkv_bias_separate", True) is False:
            module.qkv_bias_separate = True
            switched += 1
    return switched


def _targets(model, towers: list[str], targets: list[str]) -> tuple[list[str], list[str]]:
    """Full names of the Linear modules and bare weight parameters `targets` picks in `towers`. "attn" must find
    attention in every adapted tower (a tower without any is named); any other target somewhere."""
    modules, params, unmatched = [], [], []
    for target in targets:
        found = 0
        for tower_name in towers:
            tower = getattr(model, tower_name)
            kind = _kind(model, tower_name)
            suffixes = _timm_layers(tower, _TIMM_OWNERS[target]) if kind == "timm" and target in _TIMM_OWNERS \
                else _ALIASES[kind].get(target, (target,))
            in_tower = 0
            # nn.MultiheadAttention reads its out_proj's weight without calling it: an adapter there would never act.
            inside_mha = {f"{n}.out_proj" for n, m in tower.named_modules() if isinstance(m, nn.MultiheadAttention)}
            for name, module in tower.named_modules():
                full = f"{tower_name}.{name}"
                if isinstance(module, nn.Linear) and _ends_with(name, suffixes) and name not in inside_mha:
                    if not (target == "mlp" and ".attention." in full):  # BERT's output.dense is also in attention
                        modules.append(full)
                        in_tower += 1
            for name, param in tower.named_parameters():
                if param.ndim == 2 and name.endswith("in_proj_weight") and _ends_with(name, suffixes):
                    params.append(f"{tower_name}.{name}")
                    in_tower += 1
            if target == "attn" and not in_tower:
                other = "lock_image=True" if tower_name == "visual" else "lock_text=True"
                raise UserError(f"lora_targets 'attn': the {_tower_title(model, tower_name)} has no attention layer "
                                f"for an adapter; set lora_targets to 'mlp' or Linear layer names, or {other} to "
                                f"adapt the other tower alone")
            found += in_tower
        if not found:
            unmatched.append(target)
    if unmatched:
        linear = sorted({n.rsplit(".", 1)[-1] for t in towers for n, m in getattr(model, t).named_modules()
                         if isinstance(m, nn.Linear)})
        resnet = " (a ResNet image tower has no MLP: its only Linear layers are its attention pool's)" \
            if "visual" in towers and _kind(model, "visual") == "resnet" else ""
        raise UserError(f"lora_targets {', '.join(map(repr, unmatched))} match no layer of the "
                        f"{' and '.join(towers)} tower(s){resnet}; use 'attn', 'mlp' or a Linear layer's name "
                        f"({', '.join(linear)})")
    return sorted(set(modules)), sorted(set(params))


def add_lora(model, cfg: dict) -> list[str]:
    """Freeze the model and wrap the targeted layers of each unlocked tower in LoRA adapters, in place.

    `logit_scale` (and a SigLIP model's `logit_bias`) keep training. Returns the towers that received adapters."""
    from peft import LoraConfig, inject_adapter_in_model

    towers = [name for name, locked in (("visual", cfg["lock_image"]), ("text", cfg["lock_text"])) if not locked]
    if not towers:
        raise UserError("lora_r > 0 with lock_image and lock_text both true leaves no tower for the adapters; "
                        "unlock one of them")
    # A CoCa's caption decoder, which no lock freezes, takes adapters too: the caption loss trains them.
    modules, params = _targets(model, towers + (["text_decoder"] if getattr(model, "text_decoder", None) is not None
                                                else []), list(cfg["lora_targets"]))
    for p in model.parameters():
        p.requires_grad_(False)
    _call_fused_qkv_layers(model)
    config = LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                        target_modules=modules or None, target_parameters=params or None, bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    model.logit_scale.requires_grad_(True)
    if model.logit_bias is not None:
        model.logit_bias.requires_grad_(True)
    return towers


def _tuner_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    # Deepest first: an adapted attention's out_proj is itself adapted inside it.
    return [(name, m) for name, m in reversed(list(model.named_modules())) if isinstance(m, BaseTunerLayer)]


def has_lora(model: nn.Module) -> bool:
    return bool(_tuner_layers(model))


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain copy of `model` with every adapter merged into its base weights and the wrappers gone."""
    plain = copy.deepcopy(model)
    for name, layer in _tuner_layers(plain):
        layer.merge(adapter_names=[ADAPTER_NAME])
        parent_name, _, child = name.rpartition(".")
        base = layer.get_base_layer()
        setattr(plain.get_submodule(parent_name) if parent_name else plain, child, base)
    if hasattr(plain, "peft_config"):
        del plain.peft_config
    return plain


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights to save: OpenAI's keys, adapters merged where there are any, on the CPU."""
    source = merged_copy(model) if has_lora(model) else model
    return {k: v.detach().cpu() for k, v in source.state_dict().items()}


def save_adapter(model: nn.Module, folder: str | Path) -> Path:
    """The adapter alone (peft's state dict and config), a small file beside the merged weights."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    atomic_write_bytes(save(tensors), folder / "adapter_model.safetensors")
    config = model.peft_config[ADAPTER_NAME].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    atomic_write_bytes(json.dumps(config, indent=1, default=str).encode(), folder / "adapter_config.json")
    return folder
