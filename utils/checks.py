"""Checks of a script's settings that need no torch, run before it is imported: a misspelt choice or a missing
file is reported in a fraction of a second instead of after seconds of importing."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from utils.errors import UserError

# utils.device.PRECISIONS' names (tests/test_start.py holds them equal); that module imports torch.
PRECISION_NAMES = ("fp32", "fp16", "bf16")
# What runs a model's towers at inference (clip.CLIP's runtime; nets/ort.py); "auto" picks one by the CPU.
RUNTIME_NAMES = ("torch", "onnxruntime", "auto")


def one_of(cfg: dict, name: str, choices: Sequence, also: Sequence = ()) -> None:
    """cfg[name] must be one of `choices` (or of `also`, values such as "" or None meaning "decide for me")."""
    if cfg[name] not in (*choices, *also):
        raise UserError(f"{name} {cfg[name]!r} is not one of {', '.join(map(str, choices))}")


def is_weight_name(model_path: str | Path) -> bool:
    """Whether `model_path` is written as a name (a tag, hf-hub:, a URL) rather than as a path. Here, not in
    utils/weights/pretrained.py which resolves the names: that module imports torch."""
    text = str(model_path)
    return text.startswith("hf-hub:") or bool(re.match(r"https?://", text)) or bool(re.fullmatch(r"[\w-]+", text))


def weights_exist(path: str, setting: str = "model_path") -> None:
    """A weight setting must name an existing file or folder, or be written as a weight name for the loader to
    fetch: a pretrained tag, hf-hub:ORG/NAME or a URL. '' means random weights."""
    text = str(path)
    if not text or Path(text).exists() or is_weight_name(text):
        return
    random = "; model_path='' starts from random weights" if setting == "model_path" else ""
    raise UserError(f"{setting} {path} does not exist and is not a weight name. Give a file or folder, a pretrained "
                    "tag with its phi (--phi ViT-B-32 --model_path laion2b_s34b_b79k, or openai), hf-hub:ORG/NAME or "
                    f"an http(s) URL (README, 'Weights'){random}.")


def file_exists(cfg: dict, name: str, what: str) -> None:
    if not Path(cfg[name]).is_file():
        raise UserError(f"{what} {cfg[name]} does not exist; check {name}")


def folder_exists(cfg: dict, name: str, what: str) -> None:
    if not Path(cfg[name]).is_dir():
        raise UserError(f"{name} {cfg[name]} does not exist; point it at {what}")
