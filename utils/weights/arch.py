"""The architecture beside a weight file: `<file>.json`, written with the weights this project saves and read by
phi='auto', so that what tensor shapes cannot show (activation, head counts) is known, not guessed; with it the
preprocessing the weights were trained with (utils/data/preprocess.py), so that a model fine-tuned from LAION's
weights keeps their mean and std; and the captions' language where a run set one (NLLB-CLIP's text_language), so that
a tower fine-tuned on French captions is asked in French.

The weight file itself stays a plain OpenAI-key state dict, byte for byte what `torch.save(state_dict)` writes:
`torch.load` gives the state dict, and open_clip's `load_checkpoint` loads it strictly.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from nets.configs import CLIPConfig
from utils.data.preprocess import Preprocess
from utils.errors import UserError
from utils.files import atomic_save, atomic_write_bytes

_FORMAT = "clip-pytorch architecture"


def arch_path(weights: str | Path) -> Path:
    """`best_epoch_weights.pth` -> `best_epoch_weights.pth.json`: the whole name, so no other file shares it."""
    weights = Path(weights)
    return weights.with_name(weights.name + ".json")


def save_weights(state_dict, path: str | Path, config: CLIPConfig, phi: str,
                 preprocess: Preprocess | None = None, text_language: str | None = None) -> None:
    """The state dict to `path` and its architecture beside it, each written atomically.

    The old record goes first: a crash between the two writes leaves weights with no record (auto then says
    what it assumes), never new weights with an old record that could name another activation.
    """
    path = Path(path)
    arch_path(path).unlink(missing_ok=True)
    atomic_save(state_dict, path)
    write_arch(path, config, phi, preprocess, text_language)


def write_arch(weights: str | Path, config: CLIPConfig, phi: str = "custom",
               preprocess: Preprocess | None = None, text_language: str | None = None) -> Path:
    """Record the architecture of the existing weight file `weights` beside it (also for files saved elsewhere),
    its preprocessing (None: OpenAI's, left out of the record) and its captions' language (None or "": the
    tokenizer's default, left out)."""
    weights = Path(weights)
    record = {"format": _FORMAT, "phi": phi, "bytes": weights.stat().st_size, "clip": config.to_dict(),
              **({"preprocess": preprocess.to_dict()} if preprocess is not None else {}),
              **({"text_language": text_language} if text_language else {})}
    atomic_write_bytes((json.dumps(record, indent=1) + "\n").encode(), arch_path(weights))
    return arch_path(weights)


def read_arch(path: str | Path) -> tuple[CLIPConfig, Preprocess | None, str, str | None] | None:
    """(config, preprocessing or None where the record has none, what to call its source in messages, the captions'
    language or None) from the record beside `path`, or None when there is none.

    A record written for other bytes (the weights replaced by hand) is ignored, with one line saying so; a record
    written by hand may leave `bytes` out.
    """
    path, record_path = Path(path), arch_path(path)
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{record_path} is not readable JSON ({e}); it should record the architecture of {path.name}"
                        ": delete it to let phi='auto' read the tensor shapes, or pass phi") from e
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        return None  # someone else's JSON that happens to share the name
    if "bytes" in record and record["bytes"] != path.stat().st_size:
        print(f"{record_path} records a file of {record.get('bytes')} bytes, but {path.name} has "
              f"{path.stat().st_size}: the weights were replaced, so the record is ignored", file=sys.stderr)
        return None
    preprocess = Preprocess.from_dict(record["preprocess"], str(record_path)) if "preprocess" in record else None
    language = record.get("text_language")
    if language is not None and not (isinstance(language, str) and language):
        raise UserError(f"{record_path}: text_language {language!r} is not a language code like 'fra_Latn'; fix it or "
                        "delete the key")
    try:
        return CLIPConfig.from_dict(record["clip"]), preprocess, str(record_path), language
    except (KeyError, TypeError) as e:
        raise UserError(f"{record_path} does not hold a valid architecture ({e}); delete it or fix it "
                        "(README, 'Models')") from e
