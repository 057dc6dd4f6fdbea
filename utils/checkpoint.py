"""Atomic checkpoint writes and the full training state used by `resume`."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from .errors import UserError

STATE_PATTERN = re.compile(r"^state_step(\d+)\.pt$")


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to `path` atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    _atomic_write(path, lambda f: f.write(data))


def _atomic_write(path: str | Path, write) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: a crash leaves the old file or the new one."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write in {path.parent} ({e.strerror or e}); choose a writable save_dir") from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"could not write {path} ({e.strerror or e}); free disk space or choose another "
                            "save_dir. Earlier checkpoints are untouched.") from e
        raise


def check_writable(folder: Path, setting: str = "save_dir") -> None:
    """Fail before the work, not at the first save hours later; `setting` names the variable to change."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{setting} {folder} is not writable ({e.strerror or e}); choose another {setting}") from e


def state_path(save_dir: str | Path, global_step: int) -> Path:
    return Path(save_dir) / f"state_step{global_step:08d}.pt"


def _states(save_dir: str | Path) -> list[Path]:
    """Training states in `save_dir`, oldest step first."""
    found = [(int(m.group(1)), p) for p in Path(save_dir).glob("state_step*.pt") if (m := STATE_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_state(save_dir: str | Path) -> Path | None:
    states = _states(save_dir)
    return states[-1] if states else None


def prune_states(save_dir: str | Path, keep: int) -> None:
    for path in _states(save_dir)[:-keep]:
        path.unlink(missing_ok=True)


def load_state(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"resume file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"refusing to resume from {path}: not a training state this project wrote "
                        f"({str(e).splitlines()[0][:200]})") from e
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch", "config"} <= set(state):
        raise UserError(f"{path} is not a full training state (it lacks model/optimizer/epoch/config); "
                        "to start from plain weights use model_path instead of resume")
    return state
