"""The folder layouts weights come in, known once: open_clip's (`open_clip_config.json` beside one weight file),
then transformers' (`config.json` + weights, `preprocessor_config.json` for the image processor).

The same rule serves a hub repo (files fetched on first use) and a folder on disk: `find_layout` asks a
`get(name) -> Path | None` for the files, and `read_layout` turns what it found into the architecture and the
preprocessing record the weights were trained with.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nets.configs import CLIPConfig
from nets.open_clip_configs import from_open_clip
from utils.data.preprocess import Preprocess
from utils.errors import UserError
from utils.weights.layouts import config_from_transformers

OPEN_CLIP_CONFIG, TRANSFORMERS_CONFIG, IMAGE_PROCESSOR = "open_clip_config.json", "config.json", \
    "preprocessor_config.json"
# Safetensors first in each: nothing is unpickled where the repo offers both.
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TRANSFORMERS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")
# (kind, config file, weight files), in the order they are tried.
LAYOUTS = (("open_clip", OPEN_CLIP_CONFIG, OPEN_CLIP_FILES), ("transformers", TRANSFORMERS_CONFIG, TRANSFORMERS_FILES))
# A folder of weights without either config (saved by hand) is read by its file names alone.
BARE_FILES = TRANSFORMERS_FILES + OPEN_CLIP_FILES


@dataclass(frozen=True)
class Layout:
    kind: str  # "open_clip", "transformers", or "bare" (weights without a config)
    weights: tuple[Path, ...]  # one file, or a sharded checkpoint's shards
    config: Path | None = None
    image_processor: Path | None = None  # transformers' preprocessor_config.json, where there is one

    @property
    def folder(self) -> Path:
        return self.weights[0].parent


def find_layout(get: Callable[[str], Path | None], where: str, weights_name: str | None = None,
                optional: Callable[[str], Path | None] | None = None) -> Layout | None:
    """The first layout whose config `get` finds, with its weights; None when neither config is there.

    `weights_name`: only a layout with a weight file of that name (a file the user named) counts, and that file
    is its weights. `optional` fetches files that may be missing without that being an error (the image
    processor's config); `get` by default. A config without any of its weight files is refused, naming `where`.
    """
    for kind, config_name, names in LAYOUTS:
        if weights_name is not None and weights_name not in names:
            continue
        config = get(config_name)
        if config is None:
            continue
        if weights_name is not None:
            weights = get(weights_name)
        else:
            weights = next((path for name in names if (path := get(name)) is not None), None)
        if weights is None:
            raise UserError(f"{where} has {config_name} but " + (f"no {weights_name}" if weights_name else
                            ("neither " + " nor ".join(names) if len(names) == 2 else f"none of {', '.join(names)}")))
        shards = (weights,)
        if weights.name.endswith(".index.json"):
            shards = tuple(get(shard) or weights.parent / shard for shard in _shard_names(weights))
        processor = (optional or get)(IMAGE_PROCESSOR) if kind == "transformers" else None
        return Layout(kind, shards, config, processor)
    return None


def folder_layout(folder: Path) -> Layout:
    """The layout of a folder on disk, or its bare weight files; refused when it holds no weights at all."""
    def get(name: str) -> Path | None:
        return folder / name if (folder / name).is_file() else None

    layout = find_layout(get, str(folder))
    if layout is not None:
        return layout
    for name in BARE_FILES:
        if (path := get(name)) is not None:
            shards = tuple(folder / s for s in _shard_names(path)) if name.endswith(".index.json") else (path,)
            return Layout("bare", shards)
    names = [n for n in BARE_FILES if not n.endswith(".index.json")]
    raise UserError(f"{folder} is a folder without {', '.join(names[:-1])} or {names[-1]}; point model_path at a "
                    "weight file, a transformers save_pretrained folder or an open_clip hub repo's files")


def file_layout(path: Path) -> Layout | None:
    """The layout a weight file belongs to: its folder's config, where the file has that layout's name."""
    folder = path.parent

    def get(name: str) -> Path | None:
        return folder / name if (folder / name).is_file() else None

    return find_layout(get, str(folder), weights_name=path.name)


def read_layout(layout: Layout) -> tuple[CLIPConfig, Preprocess | None, str] | None:
    """(architecture, preprocessing record or None where the files say nothing of it, the config's path) of a
    layout with a config; None for bare weights."""
    if layout.config is None:
        return None
    data = _json(layout.config)
    try:
        config = from_open_clip(data["model_cfg"]) if layout.kind == "open_clip" else config_from_transformers(data)
    except (KeyError, TypeError) as e:
        raise UserError(f"{layout.config} is not a readable {layout.config.name} ({type(e).__name__}: {e})") from e
    except UserError as e:
        raise UserError(f"{layout.config}: {e}") from e
    if layout.kind == "open_clip":
        cfg = data.get("preprocess_cfg")
        preprocess = Preprocess.from_open_clip(cfg, str(layout.config)) if isinstance(cfg, dict) else None
    else:
        processor = layout.image_processor
        preprocess = Preprocess.from_transformers(_json(processor), str(processor)) if processor else None
    return config, preprocess, str(layout.config)


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable {path.name} ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not the object {path.name} should be")
    return data


def _shard_names(index: Path) -> list[str]:
    try:
        return sorted(set(_json(index)["weight_map"].values()))
    except (KeyError, AttributeError, TypeError) as e:
        raise UserError(f"{index} has no weight_map of shard files ({e})") from e
