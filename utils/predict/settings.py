"""predict.py's settings that can be checked before torch is imported (utils/checks.py); the inputs it reads
are utils/predict/inputs.py's."""
from __future__ import annotations

from utils.checks import PRECISION_NAMES, RUNTIME_NAMES, one_of, weights_exist
from utils.errors import UserError
from utils.predict.modes import MODES


def check_settings(cfg: dict) -> None:
    one_of(cfg, "mode", tuple(MODES))
    one_of(cfg, "precision", PRECISION_NAMES, also=(None,))
    one_of(cfg, "runtime", RUNTIME_NAMES)
    one_of(cfg, "embed_dtype", ("float16", "float32"))
    one_of(cfg, "generation", ("beam_search", "greedy", "top_k", "top_p"))
    if cfg["part_size"] < 1:
        raise UserError(f"part_size must be at least 1, got {cfg['part_size']}")
    if cfg["mode"] == "index" and not cfg["index_dir"]:
        raise UserError("mode index writes the index to index_dir, which is empty; give --index_dir FOLDER (a new "
                        "or empty folder)")
    if cfg["mode"] not in ("predict_onnx", "index"):  # index reads embeddings, no model
        weights_exist(cfg["model_path"])
