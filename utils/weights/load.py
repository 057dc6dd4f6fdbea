"""Reading weight files of every supported format safely, and loading them into a model strictly.

Nothing here unpickles code: pickles go through `torch.load(weights_only=True)`, TorchScript archives
through `utils.weights.torchscript`, and `transformers` folders prefer safetensors.
"""
from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file as load_safetensors

from nets.clip import CLIP, build_model
from nets.configs import MODEL_CONFIGS, CLIPConfig, architecture_differences, get_config, phi_of, with_activation
from nets.shape_config import infer_config

from utils.data.preprocess import OPENAI, Preprocess
from utils.errors import UserError
from utils.weights.arch import arch_path, read_arch
from utils.weights.folders import file_layout, folder_layout, read_layout
from utils.weights.layouts import to_openai, unwrap
from utils.weights.memory import ensure_fits, parameter_count
from utils.weights.pretrained import locate
from utils.weights.torchscript import is_torchscript_archive, read_torchscript_state_dict


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]  # OpenAI key names
    layout: str  # the format it came in, for messages
    path: Path
    # The architecture recorded with the weights (a training state, the file beside them, open_clip's or
    # transformers' config), and where it was read, for messages.
    config: CLIPConfig | None = None
    config_source: str = ""
    # The preprocessing recorded with the weights (this project's record, open_clip's preprocess_cfg,
    # transformers' preprocessor_config.json); None where nothing says, which is OpenAI's.
    preprocess: Preprocess | None = None
    # The captions' language a run trained them with (text_language, NLLB-CLIP), where one was recorded.
    text_language: str | None = None


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


def _read_folder(folder: Path) -> tuple[Mapping[str, torch.Tensor], tuple | None]:
    """(the weights, (config, preprocessing, source, None) or None) of a folder in open_clip's or transformers' layout."""
    layout = folder_layout(folder)
    state: dict[str, torch.Tensor] = {}
    for shard in layout.weights:
        state.update(_read_file(shard))
    return state, _no_language(read_layout(layout))


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


def _recorded_with(path: Path) -> tuple | None:
    """(config, preprocessing, source, captions' language) recorded beside a weight file: this project's record,
    else the config of the library layout it belongs to (open_clip's hub files, a transformers folder), which
    records no language."""
    if (recorded := read_arch(path)) is not None:
        return recorded
    layout = file_layout(path)
    return _no_language(read_layout(layout)) if layout is not None else None


def _no_language(recorded: tuple | None) -> tuple | None:
    return None if recorded is None else (*recorded, None)


def check_dtypes(wanted: Mapping[str, torch.Tensor], checkpoint: "Checkpoint") -> None:
    """Refuse an integer or bool tensor where the model has floats: a float tensor labelled I32 in a safetensors
    header has the same byte size, loads, and predicts nan."""
    given = checkpoint.state_dict
    bad = next((k for k, v in wanted.items() if v.is_floating_point() and k in given
                and not given[k].is_floating_point()), None)
    if bad is not None:
        raise UserError(f"{checkpoint.path}: tensor {bad!r} is {str(given[bad].dtype).removeprefix('torch.')}, which "
                        "cannot hold weights (the model's is floating point); the file is damaged or was written with "
                        "the wrong dtype: save or export it again")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Any supported weight file or folder -> OpenAI-layout state dict, plus the architecture and preprocessing
    recorded with it (a training state, the record beside a file, an open_clip or transformers layout)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model_path {path} does not exist and is not a weight name. Give a file or folder, a "
                        "pretrained tag with its phi (--phi ViT-B-32 --model_path laion2b_s34b_b79k, or openai), "
                        "hf-hub:ORG/NAME or an http(s) URL (README, 'Weights'); model_path='' starts from random "
                        "weights.")
    raw, beside = _read_folder(path) if path.is_dir() else (_read_file(path), None)
    if not isinstance(raw, Mapping) or not raw:
        raise UserError(f"{path} holds a {type(raw).__name__}, not a state dict of tensors")
    state = raw.get("config") if isinstance(raw.get("config"), Mapping) and "model" in raw else None
    state_dict, layout = to_openai(unwrap(raw))
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path}: entries {bad[:5]} are not tensors; this is not a CLIP state dict")
    if state:
        preprocess = Preprocess.from_dict(state["preprocess"], str(path)) if "preprocess" in state else None
        return Checkpoint(state_dict, layout, path, CLIPConfig.from_dict(state["clip"]), f"the training state {path}",
                          preprocess, state.get("text_language"))
    recorded = beside if path.is_dir() else _recorded_with(path)
    config, preprocess, source, language = recorded or (None, None, "", None)
    return Checkpoint(state_dict, layout, path, config, source, preprocess, language)


def config_of(checkpoint: Checkpoint) -> CLIPConfig:
    """The recorded architecture, else the one tensor shapes and the table give (QuickGELU: see `resolve`)."""
    if checkpoint.config is not None:
        return checkpoint.config
    try:
        return infer_config(checkpoint.state_dict)
    except (KeyError, IndexError) as e:
        raise UserError(f"{checkpoint.path} does not look like a CLIP checkpoint (no {e} tensor); "
                        "cannot infer its architecture") from e
    except UserError as e:
        raise UserError(f"{checkpoint.path}: {e}") from e


def _activation_note(checkpoint: Checkpoint, config: CLIPConfig, phi: str) -> str:
    gelu = phi_of(with_activation(config, "gelu"))
    fix = f"pass phi={gelu!r}" if gelu else f"record the architecture in {arch_path(checkpoint.path).name} " \
                                            "beside it (README, 'Models')"
    return (f"{checkpoint.path}: tensor shapes cannot tell QuickGELU from GELU, and nothing recorded with the file "
            f"says, so it is loaded as OpenAI's QuickGELU (phi={phi!r}); for GELU weights (LAION, DataComp, most "
            f"open_clip tags) {fix}")


def resolve(checkpoint: Checkpoint, phi: str) -> tuple[CLIPConfig, str, list[str]]:
    """(config, phi, lines to show) for a checkpoint loaded as `phi`, or as its own architecture for 'auto'.

    'auto' is exact where the architecture was recorded with the weights; a bare state dict is OpenAI's
    QuickGELU, and the line says so. A named phi that the record contradicts (same shapes, other heads or
    activation) is refused: those weights would load and compute something else.
    """
    if phi == "auto":
        config = config_of(checkpoint)
        phi = phi_of(config) or "custom"
        # A SigLIP row is found by its shapes with its activations (its shapes differ from every other row's).
        exact = checkpoint.config is not None or config.vision.kind == "timm"
        return _with_bias_of(checkpoint, config), phi, [] if exact else [_activation_note(checkpoint, config, phi)]
    config = get_config(phi)
    recorded = checkpoint.config
    # Per tower: self-cn takes only the image tower of a checkpoint whose text tower is another kind.
    if recorded is not None and (differences := architecture_differences(config, recorded)):
        fit = phi_of(recorded)
        raise UserError(f"phi={phi!r} does not match {checkpoint.config_source}, which records the same sizes with "
                        f"another network ({', '.join(differences)}); pass "
                        + (f"phi={fit!r} or phi='auto'" if fit else "phi='auto'"))
    return _with_bias_of(checkpoint, config), phi, []


def _with_bias_of(checkpoint: Checkpoint, config: CLIPConfig) -> CLIPConfig:
    # A logit bias sits beside the towers, so the file decides: SigLIP's, or any model trained with the sigmoid loss.
    if "logit_bias" in checkpoint.state_dict and config.init_logit_bias is None:
        return replace(config, init_logit_bias=float(checkpoint.state_dict["logit_bias"]))
    return config


def check_fits(wanted: Mapping[str, torch.Tensor], checkpoint: Checkpoint, phi: str) -> None:
    """Refuse a checkpoint whose keys or shapes differ from `wanted` (a model's state dict, or part of it)."""
    expected = {k: tuple(v.shape) for k, v in wanted.items()}
    given = {k: tuple(v.shape) for k, v in checkpoint.state_dict.items()}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k}: checkpoint {given[k]} vs model {expected[k]}" for k in expected
              if k in given and given[k] != expected[k]]
    if not (missing or unexpected or shapes):
        check_dtypes(wanted, checkpoint)
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
    """A strict load. A model on the meta device takes the checkpoint's tensors themselves (no second copy of the
    weights in memory): contiguous, none shared by two names, cast to fp32 by the caller's `.float()`."""
    check_fits(model.state_dict(), checkpoint, phi)
    if not next(model.parameters()).is_meta:
        model.load_state_dict(checkpoint.state_dict, strict=True)
        return
    seen, state = set(), {}
    for name, tensor in checkpoint.state_dict.items():
        tensor = tensor.contiguous()
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        state[name] = tensor.clone() if where in seen else tensor  # tied names stay two parameters
        seen.add(where)
    model.load_state_dict(state, strict=True, assign=True)


@dataclass
class Opened:
    """Weights located and read, their architecture resolved: what both loads below start from."""
    checkpoint: Checkpoint
    config: CLIPConfig
    phi: str
    notes: list[str]  # lines to show
    preprocess: Preprocess  # a pretrained row's, else the one recorded with the files, else OpenAI's


def open_weights(model_path: str | Path, phi: str) -> Opened:
    """locate -> read -> resolve: a weight name is downloaded on first use, once per load."""
    if phi in MODEL_CONFIGS:  # before a download of weights that could not fit
        ensure_fits(parameter_count(get_config(phi)) * 4, f"{phi}'s weights")
    located = locate(model_path, phi)
    checkpoint = read_checkpoint(located.path)
    config, phi, notes = resolve(checkpoint, located.phi)
    # The file is in memory now; what a load adds is the fp32 copy of tensors stored in another precision.
    cast = sum(t.numel() * 4 for t in checkpoint.state_dict.values() if t.is_floating_point() and t.dtype != torch.float32)
    ensure_fits(cast, f"{located.path} in float32", announce=False)
    return Opened(checkpoint, config, phi, notes, located.preprocess or checkpoint.preprocess or OPENAI)


def preprocess_of(model: CLIP) -> Preprocess:
    """The preprocessing a model's weights were trained with: the loads here set `model.preprocess`, as open_clip
    sets `visual.preprocess_cfg`; a model built with random weights has OpenAI's."""
    return getattr(model, "preprocess", OPENAI)


def recorded_language(model: CLIP) -> str | None:
    """The captions' language recorded with a model's weights (a run's text_language; the loads here set
    `model.text_language`), or None: the tokenizer's default."""
    return getattr(model, "text_language", None)


def load_model(model_path: str | Path, phi: str) -> tuple[CLIP, str]:
    """Build the model for `phi` (or the checkpoint's own architecture for phi='auto') and load it.

    `model_path` may be a weight name (utils/pretrained.py), downloaded on first use. Returns the model in fp32 on
    the CPU (its `preprocess`: see preprocess_of) and the resolved phi ('custom' when no table entry matches).
    """
    model, phi, _ = load(model_path, phi)
    return model, phi


def load(model_path: str | Path, phi: str) -> tuple[CLIP, str, Path]:
    """load_model, and the local weights behind a weight name (for caches keyed by the weights' bytes)."""
    opened = open_weights(model_path, phi)
    for line in opened.notes:
        print(line, file=sys.stderr)
    model = _built_for_loading(opened.config)
    load_into(model, opened.checkpoint, opened.phi)
    model.preprocess, model.text_language = opened.preprocess, opened.checkpoint.text_language
    return model.float(), opened.phi, opened.checkpoint.path


def _built_for_loading(config) -> CLIP:
    """The model with its parameters on the meta device, for a strict load to give the checkpoint's tensors to:
    ViT-B/32's random initialisation alone takes about a second of CPU, all of it overwritten, and a second copy of
    the weights would double the memory a large model needs. Buffers that are not in a state dict (timm's RoPE
    tables and EVA's zero k bias, transformers' BERT position ids) are computed at construction, so they are built
    for real, one tensor at a time, beside parameters that are never allocated."""
    with torch.device("meta"):
        model = build_model(config)
    saved = set(model.state_dict())
    if all(name in saved for name, _ in model.named_buffers()):
        return model  # load_into gives it the checkpoint's tensors
    model = _with_parameters_on_meta(config)
    if any(b.is_meta for name, b in model.named_buffers() if name not in saved):
        return build_model(config)  # a buffer computed from a parameter: only a real build has its value
    return model


def _with_parameters_on_meta(config) -> CLIP:
    """build_model(config) with each parameter moved to the meta device as it is registered (accelerate's
    `init_empty_weights(include_buffers=False)`): the initialisers run on meta tensors, buffers on the CPU."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        return build_model(config)
    finally:
        torch.nn.Module.register_parameter = register


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
        ensure_fits(parameter_count(get_config(phi)) * 4, f"{phi}'s weights")
        model = build_model(get_config(phi))
        text = "random"
        if model.config.text.is_bert and bert_path:
            _load_bert_folder(model, bert_path)
            text = f"BERT {bert_path}"
        return model, phi, ["image tower: random", f"text tower: {text}"]
    opened = open_weights(model_path, phi)
    checkpoint, config, phi, notes = opened.checkpoint, opened.config, opened.phi, opened.notes
    where = _where(model_path, checkpoint.path)
    visual = {k: v for k, v in checkpoint.state_dict.items() if k.startswith("visual.")}
    own_text = any(k.startswith("transformer.embeddings.") for k in checkpoint.state_dict)
    if not config.text.is_bert or own_text or not bert_path:
        model = _built_for_loading(config)  # the checkpoint's tensors become the weights: no random copy first
        # The record goes on with the fine-tuned weights.
        model.preprocess, model.text_language = opened.preprocess, checkpoint.text_language
        load_into(model, checkpoint, phi)
        return model.float(), phi, [f"image and text towers: {where} ({checkpoint.layout} layout)", *notes]
    model = build_model(config)
    model.preprocess = opened.preprocess  # its text tower is BERT's, so no language of the checkpoint's
    partial = Checkpoint({**visual, "logit_scale": checkpoint.state_dict.get("logit_scale", model.logit_scale)},
                         checkpoint.layout, checkpoint.path)
    expected = {k: v for k, v in model.state_dict().items() if k.startswith("visual.") or k == "logit_scale"}
    check_fits(expected, partial, phi)
    model.load_state_dict({**model.state_dict(), **partial.state_dict}, strict=True)
    _load_bert_folder(model, bert_path)
    return model.float(), phi, [f"image tower + logit_scale: {where} (its text tower is not used)",
                                f"text tower: BERT {bert_path}, projection random", *notes]


def _where(named, local: Path) -> str:
    return str(local) if str(named) == str(local) else f"{named} = {local}"
