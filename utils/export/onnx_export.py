"""mode="export_onnx": image.onnx, text.onnx, config.json and the tokenizer's vocabulary (SigLIP and the Hugging Face
tokenizers: their files) in export_dir.

Each file is checked in onnxruntime against the PyTorch model before anything is written, and all of them
are written at once (temporary files renamed at the end), so a failure leaves an earlier export as it was.
"""
from __future__ import annotations

import copy
import json
import os
import uuid
from pathlib import Path

import numpy as np
import torch

from utils.files import check_writable, write_error
from utils.tokenizer import (DEFAULT_BPE_PATH, HUB_TOKENIZER_FILES, SIGLIP_TOKENIZER_FILES, TOKENIZER_CONFIG_FILES,
                             XLM_SENTENCEPIECE, files_beside, tokenizer_kind)

from nets.onnx_towers import OPSET, encoders, export_or_refuse
from utils.export.preprocess import to_config

# Captions of several lengths for the parity check printed after export.
_CHECK_CAPTIONS = ["a dog", "a photo of a red car parked next to a tall building on a rainy day", "一只猫"]


def session(model: bytes | str | Path):
    import onnxruntime as ort

    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def run_session(sess, inputs: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: inputs})[0]


def export_files(model, fp16: bool = False, log=print) -> dict[str, bytes]:
    """{file name: contents} of the export of `model` (a clip.CLIP), each ONNX file checked in onnxruntime
    against PyTorch's fp32 features on a random batch; `log` gets one line per check."""
    config = model.net.config
    net = model.net.float().cpu().eval()
    g = torch.Generator().manual_seed(0)
    inputs = {"image": torch.randn(3, 3, config.vision.image_size, config.vision.image_size, generator=g),
              "text": model.tokenize(_CHECK_CAPTIONS)}
    with torch.no_grad():
        # The towers' own forward (packed text), which the exported fixed-shape paths must equal.
        expected = {"image": net.encode_image(inputs["image"]).numpy(),
                    "text": net.encode_text(inputs["text"]).numpy()}
    logit_scale = net.logit_scale.detach().exp().item()
    dtype = torch.float16 if fp16 else torch.float32
    files: dict[str, bytes] = {}
    towers = encoders(copy.deepcopy(net).half() if fp16 else net)
    for tower, encoder in towers.items():
        files[f"{tower}.onnx"] = export_or_refuse(encoder, dtype, f"{model.phi}'s {tower} tower")
        given = inputs[tower].numpy()
        if tower == "image":
            given = given.astype(np.float16 if fp16 else np.float32)
        got = run_session(session(files[f"{tower}.onnx"]), given).astype(np.float32)
        log(f"{tower}.onnx: max |onnxruntime - PyTorch fp32| = {np.abs(got - expected[tower]).max():.2e} on a batch "
            f"of {len(given)} (features up to {np.abs(expected[tower]).max():.2f})")
    kind = "hub" if config.text.tokenizer else tokenizer_kind(config.text.kind)
    if kind == "hub":  # the Hugging Face tokenizer's files, from the folder the model read them from
        files.update(tokenizer_files(model.tokenizer.folder))
        vocab = "."
    elif kind == "siglip":  # its tokenizer files, as the model read them beside its weights
        folder = files_beside(model.weights_path)
        names = [n for n in SIGLIP_TOKENIZER_FILES + TOKENIZER_CONFIG_FILES if (folder / n).is_file()]
        files.update({n: (folder / n).read_bytes() for n in names})
        vocab = "."
    else:
        path = Path(model.bert_vocab_path) if kind == "bert" else DEFAULT_BPE_PATH
        files[path.name] = path.read_bytes()
        vocab = path.name
    bias = net.logit_bias
    files["config.json"] = json.dumps({
        "phi": model.phi,
        "model": config.to_dict(),
        "image_size": config.vision.image_size,
        # The weights' preprocessing (mean, std, interpolation, resize_mode, fill), letterbox_image applied.
        **to_config(model.transform.preprocess),
        "context_length": config.text.context_length,
        "tokenizer": kind,
        # The vocabulary file, relative to the export folder ("." for SigLIP and "hub": the folder of its tokenizer
        # files).
        "vocab": vocab,
        # "hub": the Hugging Face tokenizer's name and open_clip's setting of it (CLIPA's [SEP] replaced by 0), and
        # NLLB's source-language code where one was set (text_language; null: the tokenizer's default).
        **({"hub_tokenizer": model.tokenizer.name, "strip_sep_token": model.tokenizer.strip_sep_token,
            "text_language": model.tokenizer.language} if kind == "hub" else {}),
        # The id captions are padded with, and whether columns of it alone may be dropped before text.onnx (exact
        # only where the tower masks the padding or never reads past the pooled token).
        "pad_id": int(model.tokenizer.pad_token_id),
        "trim_padding": towers["text"].trims_padding,
        "dtype": "float16" if fp16 else "float32",
        "features": "unnormalised",
        "logit_scale": logit_scale,
        # Scores are scale * cos (+ logit_bias): "sigmoid" (SigLIP's, with a bias) is one probability per caption,
        # "softmax" shares 1 over the captions.
        "logit_bias": None if bias is None else bias.detach().float().item(),
        "scores": "softmax" if bias is None else "sigmoid",
        "opset": OPSET,
    }, indent=2, ensure_ascii=False).encode("utf-8")
    return files


def tokenizer_files(folder: Path) -> dict[str, bytes]:
    """{name: contents} of the Hugging Face tokenizer files in `folder` (what transformers reads: tokenizer.json,
    a WordPiece vocab.txt or XLM-R's sentencepiece model, and its config), for the export folder."""
    names = dict.fromkeys((*HUB_TOKENIZER_FILES, XLM_SENTENCEPIECE, *TOKENIZER_CONFIG_FILES))
    return {n: (folder / n).read_bytes() for n in names if (folder / n).is_file()}


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    """All of `files` in `folder` (made if missing) or none of them: each is written and synced to a hidden
    temporary file, and only when all are on disk are they renamed over any earlier ones."""
    temps: dict[str, Path] = {}
    name = ""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            # Not mkstemp: its files are private (0600), and an export is meant to be copied and served.
            temps[name] = folder / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            with open(temps[name], "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for name, tmp in temps.items():
            os.replace(tmp, folder / name)
    except Exception as e:  # whatever the writer raised: one line, the temporary files gone first
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise write_error(folder / name, e, "the ONNX export; an earlier export there is untouched") from e
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def run_export(config: dict) -> None:
    """predict.py's export_onnx: the model of model_path/phi into export_dir."""
    from clip import CLIP

    folder = Path(config["export_dir"])
    check_writable(folder, "export_dir")
    model = CLIP.from_config(config, cuda=False, precision="fp32", runtime="torch")
    files = export_files(model, fp16=config["export_fp16"])
    write_files(folder, files)
    print(f"wrote {', '.join(files)} to {folder} ({'fp16' if config['export_fp16'] else 'fp32'}, opset {OPSET}); "
          f"run it with: python predict.py --mode predict_onnx --export_dir {folder}")
