"""predict.py's input paths, checked before any model loads: a missing image costs a second, not a model load."""
from __future__ import annotations

from pathlib import Path

from utils.errors import UserError

_FOLDER_MODES = ("dir_predict", "search")  # web starts without a folder: its search tab stays empty


def check_inputs(config: dict) -> None:
    """A UserError naming the first input of `config` that cannot be read; the weights are the loader's."""
    mode = config["mode"]
    if config["image"] and mode in ("predict", "predict_onnx"):
        image = Path(config["image"])
        if not image.is_file():
            raise UserError(f"image {image} {'is a folder' if image.is_dir() else 'does not exist'}; give the path "
                            "of an image file")
    if mode in _FOLDER_MODES and not Path(config["dir_origin_path"]).is_dir():
        raise UserError(f"dir_origin_path {config['dir_origin_path']} is not a folder; give the folder of images "
                        f"to {'score' if mode == 'dir_predict' else 'search'}")
    if config["templates"] and mode not in ("fps", "export_onnx"):
        from utils.prompts import load_templates

        load_templates(config["templates"])  # a given file or template reads alike in every language
