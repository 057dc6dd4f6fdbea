"""train.py's settings that can be checked before torch is imported (utils/checks.py)."""
from __future__ import annotations

from pathlib import Path

from utils.checks import PRECISION_NAMES, file_exists, one_of, weights_exist
from utils.data.augment import AUGMENTS
from utils.data.sources.shards import is_shard_source
from utils.errors import UserError

OPTIMIZERS = ("adamw", "adam", "sgd")
LR_DECAYS = ("cos", "step")
DEMOS = ("en", "cn")
LOSS_NAMES = ("softmax", "sigmoid")  # utils/train/loss.LOSSES, named here without torch


def check_settings(cfg: dict) -> None:
    """Choices, epochs and the files a run reads; the demo makes its own data, so only its name is checked."""
    if cfg["demo"]:
        one_of(cfg, "demo", DEMOS)
        return
    one_of(cfg, "augment", AUGMENTS)
    one_of(cfg, "loss", LOSS_NAMES, also=("",))
    check_schedule(cfg)
    one_of(cfg, "precision", PRECISION_NAMES, also=("",))
    if cfg["resume"] not in ("", "auto"):
        file_exists(cfg, "resume", "training state")
    elif not cfg["resume"]:
        weights_exist(cfg["model_path"])
    check_data_paths(cfg)


def check_schedule(cfg: dict) -> None:
    """The optimiser, the schedule and the epochs: train.py checks them before torch, run_training (which the demo
    and library callers reach without train.py's check) again before any file is touched."""
    one_of(cfg, "optimizer_type", OPTIMIZERS)
    one_of(cfg, "lr_decay_type", LR_DECAYS)
    if cfg["Init_Epoch"] >= cfg["Epoch"]:
        raise UserError(f"Init_Epoch {cfg['Init_Epoch']} leaves no epoch to train: it must be below Epoch "
                        f"{cfg['Epoch']}")


def check_data_paths(cfg: dict) -> None:
    """The data's files exist: found missing before torch is imported and the model built, not after."""
    if not Path(cfg["datasets_path"]).is_dir():
        raise UserError(f"datasets_path {cfg['datasets_path']} does not exist; point it at the folder the JSON image "
                        "paths are relative to")
    for setting in ("datasets_train_json_path", "datasets_val_json_path"):
        path = cfg[setting]
        if not (setting == "datasets_train_json_path" and is_shard_source(path)) and not Path(path).is_file():
            raise UserError(f"{setting} {path} does not exist; give the caption file to "
                            f"{'train on' if 'train' in setting else 'validate on'}")
