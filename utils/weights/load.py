"""Reading weight files of every supported format safely, and loading them into a model strictly.

Nothing here unpickles code: pickles go through `torch.load(weights_only=True)`, TorchScript archives
through `utils.weights.torchscript`, and `transformers` folders prefer safetensors.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file as load_safetensors

from nets.clip import CLIP, build_model
from nets.configs import CLIPConfig, get_config, infer_config, phi_of

from utils.errors import UserError
from utils.weights.layouts import to_openai, unwrap
from utils.weights.pretrained import OPEN_CLIP_FILES, TRANSFORMERS_FILES, locate
from utils.weights.torchscript import is_torchscript_archive, read_torchscript_state_dict

# transformers' save_pretrained names first, then open_clip's hub names (a folder holding such a repo's files).
_HF_FILES = TRANSFORMERS_FILES + OPEN_CLIP_FILES


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]  # OpenAI key names
    layout: str  # the format it came in, for messages
    path: Path
    config: CLIPConfig | None = None  # recorded by this project's training states


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).split("\n")[0][:300]
        raise UserError(f"refusing to load {path}: it is a pickle that asks to run code or build objects other "
                        f"than tensors ({reason}). Weight files never need that. If you trust the file, "
                        "re-save its state dict with safetensors or torch.save(state_dict) and load that.") from e
    except Exception as e:  # the weights-only unpickler fails in many ways on files that are not pickles
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path} is not a readable weight file ({reason}). "
                        "Point model_path at a .pth/.pt/.bin/.safetensors checkpoint or a transformers folder.") from e


def _read_hf_folder(folder: Path) -> Mapping[str, torch.Tensor]:
    for name in _HF_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return _read_file(path)
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_read_file(folder / shard))
        return state
    names = [n for n in _HF_FILES if not n.endswith(".index.json")]
    raise UserError(f"{folder} is a folder without {', '.join(names[:-1])} or {names[-1]}; point model_path at a "
                    "weight file, a transformers save_pretrained folder or an open_clip hub repo's files")


def _read_file(path: Path) -> Mapping:
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(path)
        except Exception as e:  # safetensors raises its own untyped errors for corrupt headers
            raise UserError(f"{path} is not a readable safetensors file ({e})") from e
    if is_torchscript_archive(path):
        try:
            return read_torchscript_state_dict(path)
        except pickle.UnpicklingError as e:
            raise UserError(f"refusing to load TorchScript archive {path}: {e}") from e
    return _torch_load(path)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Any supported weight file or folder -> OpenAI-layout state dict (plus the config it recorded)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model_path {path} does not exist and is not a weight name. Give a file or folder, a "
                        "pretrained tag with its phi (--phi ViT-B-32 --model_path laion2b_s34b_b79k, or openai), "
                        "hf-hub:ORG/NAME or an http(s) URL (README, 'Weights'); model_path='' starts from random "
                        "weights.")
    raw = _read_hf_folder(path) if path.is_dir() else _read_file(path)
    if not isinstance(raw, Mapping) or not raw:
        raise UserError(f"{path} holds a {type(raw).__name__}, not a state dict of tensors")
    config = raw.get("config") if isinstance(raw.get("config"), Mapping) and "model" in raw else None
    state_dict, layout = to_openai(unwrap(raw))
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path}: entries {bad[:5]} are not tensors; this is not a CLIP state dict")
    return Checkpoint(state_dict, layout, path, CLIPConfig.from_dict(config["clip"]) if config else None)


def config_of(checkpoint: Checkpoint) -> CLIPConfig:
    if checkpoint.config is not None:
        return checkpoint.config
    try:
        return infer_config(checkpoint.state_dict)
    except (KeyError, IndexError) as e:
        raise UserError(f"{checkpoint.path} does not look like a CLIP checkpoint (no {e} tensor); "
                        "cannot infer its architecture") from e


def check_fits(wanted: Mapping[str, torch.Tensor], checkpoint: Checkpoint, phi: str) -> None:
    """Refuse a checkpoint whose keys or shapes differ from `wanted` (a model's state dict, or part of it)."""
    expected = {k: tuple(v.shape) for k, v in wanted.items()}
    given = {k: tuple(v.shape) for k, v in checkpoint.state_dict.items()}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k}: checkpoint {given[k]} vs model {expected[k]}" for k in expected
              if k in given and given[k] != expected[k]]
    if not (missing or unexpected or shapes):
        return
    lines = [f"{checkpoint.path} ({checkpoint.layout} layout) does not fit phi={phi!r}:"]
    for title, items in (("shape mismatches", shapes), ("missing keys", missing), ("unexpected keys", unexpected)):
        if items:
            lines.append(f"  {len(items)} {title}, first: " + "; ".join(items[:5]))
    try:
        guess = phi_of(config_of(checkpoint))
        lines.append(f"  the checkpoint looks like phi={guess!r}" if guess else "  try phi='auto'")
    except UserError:
        pass
    raise UserError("\n".join(lines))


def load_into(model: CLIP, checkpoint: Checkpoint, phi: str) -> None:
    check_fits(model.state_dict(), checkpoint, phi)
    model.load_state_dict(checkpoint.state_dict, strict=True)


def load_model(model_path: str | Path, phi: str) -> tuple[CLIP, str]:
    """Build the model for `phi` (or the checkpoint's own architecture for phi='auto') and load it.

    `model_path` may be a weight name (utils/pretrained.py), downloaded on first use. Returns the model in fp32 on
    the CPU and the resolved phi ('custom' when no table entry matches).
    """
    model_path, phi = locate(model_path, phi)
    checkpoint = read_checkpoint(model_path)
    if phi == "auto":
        config = config_of(checkpoint)
        phi = phi_of(config) or "custom"
    else:
        config = get_config(phi)
    model = build_model(config)
    load_into(model, checkpoint, phi)
    return model.float(), phi


def _load_bert_folder(model: CLIP, bert_path: str | Path) -> None:
    """Copy a local Hugging Face BERT (e.g. bert-base-chinese) into the text tower of a BERT-text CLIP."""
    from transformers import BertModel

    folder = Path(bert_path)
    if not (folder / "config.json").is_file():
        raise UserError(f"phi needs BERT weights for its text tower, but {folder} holds no transformers model "
                        "(config.json + weights). Download bert-base-chinese there, set bert_path to your copy, "
                        "or set bert_path='' to start the text tower from random weights.")
    bert = BertModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=model.text.pooled)
    tower = model.text.transformer
    given = {k: tuple(v.shape) for k, v in bert.state_dict().items()}
    wanted = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    if given != wanted:
        diff = [k for k in wanted if given.get(k) != wanted[k]][:5]
        raise UserError(f"BERT at {folder} does not fit phi's text tower; first differences: {diff}")
    tower.load_state_dict(bert.state_dict())


def init_model(phi: str, model_path: str | Path, bert_path: str | Path = "") -> tuple[CLIP, str, list[str]]:
    """Model for training: a full checkpoint, or its image tower plus BERT from `bert_path`, or random.

    Returns (model, resolved phi, lines saying where each tower came from). Partial loads happen only
    when the checkpoint's image tower fits exactly; anything else is the usual mismatch error.
    """
    if not model_path:
        if phi == "auto":
            raise UserError("phi='auto' reads the architecture from model_path, which is empty")
        model = build_model(get_config(phi))
        text = "random"
        if model.config.text.is_bert and bert_path:
            _load_bert_folder(model, bert_path)
            text = f"BERT {bert_path}"
        return model, phi, ["image tower: random", f"text tower: {text}"]
    named = model_path
    model_path, phi = locate(model_path, phi)
    checkpoint = read_checkpoint(model_path)
    config = config_of(checkpoint) if phi == "auto" else get_config(phi)
    phi = (phi_of(config) or "custom") if phi == "auto" else phi
    model = build_model(config)
    visual = {k: v for k, v in checkpoint.state_dict.items() if k.startswith("visual.")}
    own_text = any(k.startswith("transformer.embeddings.") for k in checkpoint.state_dict)
    if not config.text.is_bert or own_text or not bert_path:
        load_into(model, checkpoint, phi)
        where = f"{_where(named, model_path)} ({checkpoint.layout} layout)"
        return model.float(), phi, [f"image and text towers: {where}"]
    partial = Checkpoint({**visual, "logit_scale": checkpoint.state_dict.get("logit_scale", model.logit_scale)},
                         checkpoint.layout, checkpoint.path)
    expected = {k: v for k, v in model.state_dict().items() if k.startswith("visual.") or k == "logit_scale"}
    check_fits(expected, partial, phi)
    model.load_state_dict({**model.state_dict(), **partial.state_dict}, strict=True)
    _load_bert_folder(model, bert_path)
    return model.float(), phi, [f"image tower + logit_scale: {_where(named, model_path)} (its text tower is not used)",
                                f"text tower: BERT {bert_path}, projection random"]



def _where(named, local: Path) -> str:
    return str(local) if str(named) == str(local) else f"{named} = {local}"
