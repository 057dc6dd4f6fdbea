"""predict.py's inputs and outputs, checked before any model loads: a missing image costs a second, not a model load."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from utils.errors import UserError
from utils.files import output_name, refuse_existing

_FOLDER_MODES = ("dir_predict", "search")  # web starts without a folder: its search tab stays empty


def check_inputs(config: dict) -> None:
    """A UserError naming the first input of `config` that cannot be read; the weights are the loader's."""
    mode = config["mode"]
    if config["image"] and mode in ("predict", "predict_onnx"):
        image = Path(config["image"])
        if not image.is_file():
            raise UserError(f"image {image} {'is a folder' if image.is_dir() else 'does not exist'}; give the path "
                            "of an image file")
    if mode in _FOLDER_MODES and not Path(config["dir_origin_path"]).is_dir() and not _built_index(config):
        raise UserError(f"dir_origin_path {config['dir_origin_path']} is not a folder; give the folder of images "
                        f"to {'score' if mode == 'dir_predict' else 'search'}")
    if mode == "dir_predict":
        refuse_existing([predictions_path(config)], config["overwrite"], "another dir_save_path")
    if mode == "caption":
        from utils.predict.caption import caption_path, existing_captions

        if not Path(config["dir_origin_path"]).is_dir():
            raise UserError(f"dir_origin_path {config['dir_origin_path']} is not a folder; give the folder of images "
                            "to caption")
        existing_captions(caption_path(config))  # a file a rerun could not append to is refused now
    if config["templates"] and mode not in ("fps", "export_onnx", "export_hf"):
        from utils.prompts import load_templates

        load_templates(config["templates"])  # a given file or template reads alike in every language


def _built_index(config: dict) -> bool:
    from utils.predict.index import is_built_index  # numpy and the index's format: not needed by most modes

    return is_built_index(config["index_dir"])


def predictions_path(config: dict) -> Path:
    """dir_predict's CSV: named by the weights (with their run folder) and the folder scored, so another run's
    predictions are never the same file."""
    name = output_name(config["model_path"], Path(config["dir_origin_path"]).resolve().name)
    return Path(config["dir_save_path"]) / f"predictions_{name}.csv"


def search_inputs(config: dict, explicit: dict) -> dict:
    """search and web: `config` with index_dir resolved, and dir_origin_path the folder its folder search indexes
    when only index_dir was given. An index_dir is used only as given: one that holds no index of this project
    (missing, empty, another program's or version's index.json) is refused, unless the user asked to index a folder
    there (dir_origin_path given); a folder search is never pointed at another folder behind the user's back."""
    from utils.predict.index import read_manifest, refuse_foreign_folder  # numpy: not needed by most modes

    folder_given, given = "dir_origin_path" in explicit, bool(config["index_dir"])
    where = index_dir(config)
    config = {**config, "index_dir": where}
    manifest = read_manifest(where, older=config["rebuild_index"])
    if manifest is not None and manifest.get("embeddings_dir") != ".":
        return config  # built by mode "index": answered from as it is
    if manifest is not None:
        recorded = manifest.get("folder")
        if recorded and not folder_given:
            return {**config, "dir_origin_path": recorded}
        if recorded and Path(recorded).resolve() != Path(config["dir_origin_path"]).resolve() \
                and not config["rebuild_index"]:
            raise UserError(f"index_dir {where} is the folder search of {recorded}, not of "
                            f"{config['dir_origin_path']}; give that --dir_origin_path, another index_dir, or "
                            "--rebuild_index true to index the new folder there instead")
        return config
    if given and not folder_given:
        state = ("does not exist" if not Path(where).exists() else
                 "is empty" if Path(where).is_dir() and not any(Path(where).iterdir()) else "holds no index.json")
        raise UserError(f"index_dir {where} {state}: it holds no index to search; build one with python predict.py "
                        f"--mode index --embeddings_dir E --index_dir {where}, or index a folder of images there with "
                        "--dir_origin_path FOLDER")
    refuse_foreign_folder(where, "a folder search")
    return config


def index_dir(config: dict) -> str:
    """The search index's folder: index_dir when set, else one per indexed folder under logs/search_index, so
    switching between folders keeps each one's features instead of re-encoding everything."""
    if config["index_dir"]:
        return config["index_dir"]
    folder = Path(config["dir_origin_path"]).resolve()
    key = hashlib.sha256(str(folder).encode("utf-8")).hexdigest()[:8]
    name = re.sub(r"[^\w.-]+", "_", folder.name) or "root"
    return str(Path("logs") / "search_index" / f"{name}_{key}")
