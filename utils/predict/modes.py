"""predict.py's modes as a table: each name's function takes the config (checked by settings and inputs first).
Imports nothing heavy at import time, so that settings can name the modes before torch is imported."""
from __future__ import annotations

from typing import Callable

from utils.errors import UserError


def _clip(config: dict):
    from clip import CLIP

    return CLIP.from_config(config)


def _scorer(model, config: dict) -> tuple[list[str], object, Callable]:
    """(names, their unit class embeddings or None for captions, picture -> probabilities (1, names))."""
    if config["labels"]:
        names = list(config["labels"])
        targets = model.class_embeddings(names, config["templates"])
        return names, targets, lambda picture: model.classify(picture, targets)
    names = list(config["captions"])
    if not names:
        raise UserError("nothing to score against: give captions or labels (--captions \"a dog\" \"a cat\", or "
                        "--labels dog cat)")
    return names, None, lambda picture: model.detect_image(picture, names)


def answer(model, score: Callable, path: str, names: list[str]) -> str | None:
    """Print each name's probability for the image at `path`; or return why the image cannot be read."""
    try:
        picture = model.open_image(path)
    except Exception as e:  # any unreadable path (missing, directory, not an image, too large)
        return f"cannot open {path!r} ({type(e).__name__}: {e})"
    for p, name in sorted(zip(score(picture)[0], names), key=lambda pair: -pair[0]):
        print(f"{p:.4f}  {name}")
    if model.independent:
        from utils.prompts import INDEPENDENT

        print(f"({INDEPENDENT})")
    return None


def _predict_with(model, config: dict) -> None:
    """Once for --image, else a loop asking for image paths."""
    names, _, score = _scorer(model, config)
    if config["image"]:
        if problem := answer(model, score, config["image"], names):
            raise UserError(problem)
        return
    from utils.predict.ask import ask_loop

    ask_loop("Input image path: ", lambda path: answer(model, score, path, names))


def predict(config: dict) -> None:
    _predict_with(_clip(config), config)


def predict_onnx(config: dict) -> None:
    from utils.export.onnx_predict import OnnxCLIP

    # The same calls as CLIP's, answered by onnxruntime, without torch.
    _predict_with(OnnxCLIP(config["export_dir"], fast_decode=config["fast_decode"]), config)


def dir_predict(config: dict) -> None:
    import torch

    from utils.predict.folder import predict_folder
    from utils.predict.inputs import predictions_path

    model = _clip(config)
    names, targets, _ = _scorer(model, config)
    if targets is None:
        targets = torch.nn.functional.normalize(model.detect_image_for_eval(texts=names)[1].float(), dim=-1)
    out, scored, problems = predict_folder(model, names, targets, config["dir_origin_path"],
                                           predictions_path(config), config["top_k"], config["batch_size"])
    for problem in problems[:20]:
        print(f"skipped {problem}")
    print(f"{scored} images scored, {len(problems)} unreadable skipped; wrote {out}")


def search(config: dict) -> None:
    from utils.predict.search import run_search

    run_search(_clip(config), config)


def web(config: dict) -> None:
    from utils.web.app import serve

    serve(_clip(config), config)


def fps(config: dict) -> None:
    from utils.predict.speed import encoding_speed, format_speeds

    model = _clip(config)
    ran = "onnxruntime" if model.net.runtime is not None else "torch"  # what runtime "auto" chose, too
    label = f"{model.phi} on {model.device} ({model.precision}, runtime {ran})"
    if model.device.type == "cpu":  # the other runtime may be the faster one on this CPU (clip.py, runtime)
        label += f"; compare --runtime {'torch' if ran == 'onnxruntime' else 'onnxruntime'}"
    print(format_speeds(encoding_speed(model, (1, config["batch_size"])), label))


def embed(config: dict) -> None:
    from utils.predict.embed import run_embed

    run_embed(config)


def index(config: dict) -> None:
    from utils.predict.index import run_index

    run_index(config)


def export_onnx(config: dict) -> None:
    from utils.export.onnx_export import run_export

    run_export(config)


def export_hf(config: dict) -> None:
    from utils.export.hf import run_export_hf

    run_export_hf(config)


def caption(config: dict) -> None:
    from utils.predict.caption import caption_folder, caption_path
    from utils.predict.generate import Generation

    settings = Generation(**{name: config[name] for name in CAPTION_SETTINGS})
    out, added, kept, problems = caption_folder(_clip(config), config["dir_origin_path"], caption_path(config),
                                                settings, config["batch_size"], config["num_workers"])
    for problem in problems:
        print(f"skipped {problem}")
    print(f"{added} images captioned, {kept} kept from before, {len(problems)} unreadable skipped; wrote {out}")


# predict.py's settings that reach utils/predict/generate.Generation in mode caption.
CAPTION_SETTINGS = ("generation", "seq_len", "max_seq_len", "min_seq_len", "temperature", "top_k", "top_p",
                    "num_beams", "num_beam_groups", "repetition_penalty")


MODES: dict[str, Callable[[dict], None]] = {
    "predict": predict, "dir_predict": dir_predict, "search": search, "web": web, "fps": fps,
    "export_onnx": export_onnx, "predict_onnx": predict_onnx, "export_hf": export_hf, "embed": embed,
    "index": index, "caption": caption,
}
