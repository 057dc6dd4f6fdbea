"""eval.py's settings that can be checked before torch is imported (utils/checks.py)."""
from __future__ import annotations

from utils.checks import PRECISION_NAMES, RUNTIME_NAMES, file_exists, folder_exists, one_of, weights_exist

EVAL_TYPES = ("retrieval", "zeroshot", "wise_ft")


def check_settings(cfg: dict) -> None:
    one_of(cfg, "eval_type", EVAL_TYPES)
    one_of(cfg, "precision", PRECISION_NAMES, also=(None,))
    one_of(cfg, "runtime", RUNTIME_NAMES)
    weights_exist(cfg["model_path"])
    if cfg["eval_type"] == "wise_ft":
        weights_exist(cfg["wise_ft_start_path"], "wise_ft_start_path")
    folder_exists(cfg, "datasets_path", "the folder the JSON image paths are relative to (zeroshot: the class "
                  "folders)")
    if cfg["eval_type"] != "zeroshot":
        file_exists(cfg, "datasets_val_json_path", "annotation file")
