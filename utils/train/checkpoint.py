"""Training states (`state_step*.pt`): their names, pruning, and reading them back for `resume`."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import torch

from utils.errors import UserError

STATE_PATTERN = re.compile(r"^state_step(\d+)\.pt$")


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


def _read_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:200]
        raise UserError(f"refusing to resume from {path}: damaged, or not a training state this project wrote "
                        f"({first})") from e
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch", "config"} <= set(state):
        raise UserError(f"{path} is not a full training state (it lacks model/optimizer/epoch/config); "
                        "to start from plain weights use model_path instead of resume")
    return state


def _newest_intact(folder: Path, besides: Path) -> Path | None:
    for candidate in reversed(_states(folder)):
        if candidate.resolve() != besides.resolve():
            try:
                _read_state(candidate)
                return candidate
            except UserError:
                continue
    return None


def load_state(path: str | Path) -> dict:
    """A training state; a damaged one is refused with the newest intact state beside it and how to resume it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"resume file {path} does not exist")
    try:
        return _read_state(path)
    except UserError as e:
        intact = _newest_intact(path.parent, path)
        if intact is None:
            raise
        raise UserError(f"{e}. The newest intact state is {intact}: resume from it with the same command and "
                        f"--resume {shlex.quote(str(intact))}") from e.__cause__
