"""train.py's settings that can be checked before torch is imported (utils/checks.py)."""
from __future__ import annotations

from utils.checks import PRECISION_NAMES, file_exists, folder_exists, one_of, weights_exist
from utils.data.augment import AUGMENTS
from utils.errors import UserError

OPTIMIZERS = ("adamw", "adam", "sgd")
LR_DECAYS = ("cos", "step")
DEMOS = ("en", "cn")


def is_shard_pattern(path: str) -> bool:
    """Whether datasets_train_json_path names WebDataset shards: a brace pattern, a .tar, or a list file of shards."""
    text = str(path)
    return text.endswith(".tar") or ("{" in text and ".tar" in text) or text.endswith((".shards", ".shardlist"))


def check_settings(cfg: dict) -> None:
    """Choices, epochs and the files a run reads; the demo makes its own data, so only its name is checked."""
    if cfg["demo"]:
        one_of(cfg, "demo", DEMOS)
        return
    one_of(cfg, "augment", AUGMENTS)
    one_of(cfg, "optimizer_type", OPTIMIZERS)
    one_of(cfg, "lr_decay_type", LR_DECAYS)
    one_of(cfg, "precision", PRECISION_NAMES, also=("",))
    if cfg["Init_Epoch"] >= cfg["Epoch"]:
        raise UserError(f"Init_Epoch {cfg['Init_Epoch']} leaves no epoch to train: it must be below Epoch "
                        f"{cfg['Epoch']}")
    if cfg["resume"] not in ("", "auto"):
        file_exists(cfg, "resume", "training state")
    elif not cfg["resume"]:
        weights_exist(cfg["model_path"])
    folder_exists(cfg, "datasets_path", "the folder the JSON image paths are relative to")
    if not is_shard_pattern(cfg["datasets_train_json_path"]):
        file_exists(cfg, "datasets_train_json_path", "annotation file")
    file_exists(cfg, "datasets_val_json_path", "annotation file")
