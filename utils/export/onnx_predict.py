"""mode="predict_onnx": zero-shot scoring with an export_dir of export_onnx and onnxruntime alone.

`OnnxCLIP` answers the calls predict.py's loop makes of `clip.CLIP` (detect_image, class_embeddings,
classify) with numpy arrays; images are prepared with PIL and numpy (preprocess.py), text by the repo's
tokenizer (`ids`: int64 numpy). Nothing on this path imports torch, so a deployment needs onnxruntime, numpy,
Pillow and the tokenizer's packages (ftfy and regex; transformers for the BERT and SigLIP towers and the Hugging Face
tokenizers: CLIPA's, the hf text towers', MetaCLIP 2's XLM-V, AltCLIP's XLM-R).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from utils.errors import UserError
from utils.ort_sessions import cpu_session
from utils.tokenizer import trim_padding

from utils.export import preprocess

_FILES = ("config.json", "image.onnx", "text.onnx")


def _normalise(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-logits))


def _tokenizer(config: dict, folder: Path):
    """The tokenizer of an export: a Hugging Face one ("hub": its files in the export folder, as the PyTorch model
    read them beside its weights), else the kind's, from the vocabulary file the export holds."""
    from utils.tokenizer import HubTokenizer, build_tokenizer

    if config["tokenizer"] == "hub":
        return HubTokenizer(config["hub_tokenizer"], folder, config["context_length"],
                            strip_sep_token=config["strip_sep_token"], language=config.get("text_language"))
    return build_tokenizer(config["tokenizer"], config["context_length"], folder / config["vocab"])


class OnnxCLIP:
    def __init__(self, export_dir: str | Path, threads: int = 0, fast_decode: bool = True):
        folder = Path(export_dir)
        missing = [name for name in _FILES if not (folder / name).is_file()]
        if missing:
            raise UserError(f"export_dir {folder} lacks {', '.join(missing)}; write it first with "
                            f"python predict.py --mode export_onnx --export_dir {folder}")
        try:
            self.config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"{folder / 'config.json'} is not valid JSON ({e}); export again") from e
        self.phi = self.config["phi"]
        self.fast_decode = fast_decode
        sessions = [cpu_session(folder / name, threads, "export again with --mode export_onnx")
                    for name in ("image.onnx", "text.onnx")]
        self.image_session, self.text_session = sessions
        self.tokenizer = _tokenizer(self.config, folder)
        self.logit_scale = float(self.config["logit_scale"])
        # Exports before SigLIP have neither key: a softmax without a bias.
        self.logit_bias = self.config.get("logit_bias")
        self.independent = self.config.get("scores", "softmax") == "sigmoid"

    def open_image(self, source) -> Image.Image:
        """As `clip.CLIP.open_image`: JPEGs decoded only as large as the exported input needs."""
        from utils.data.images import open_image

        return open_image(source, self.decode_sides)

    @property
    def decode_sides(self) -> tuple[int, int] | None:
        from utils.data.images import sides_for

        return sides_for(self.config["image_size"], preprocess.record(self.config).resize_mode) \
            if self.fast_decode else None

    def preprocess(self, images: Image.Image | Sequence[Image.Image]) -> np.ndarray:
        from utils.data.images import to_rgb

        images = [images] if isinstance(images, Image.Image) else images
        return preprocess.pixels([to_rgb(image) for image in images], self.config)

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """(N, context_length) int64 ids, as text.onnx takes them."""
        return self.tokenizer.ids(texts)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        return self.image_session.run(None, {"pixels": pixels})[0].astype(np.float32)

    def encode_text(self, tokens: np.ndarray) -> np.ndarray:
        if self._trims_padding():
            tokens = trim_padding(tokens, self.config.get("pad_id", 0))
        tokens = np.ascontiguousarray(tokens)
        return self.text_session.run(None, {"tokens": tokens})[0].astype(np.float32)

    def _trims_padding(self) -> bool:
        if "trim_padding" in self.config:
            return bool(self.config["trim_padding"])
        # Exports before the key: SigLIP's and MobileCLIP's bidirectional towers read their padding, and CoCa's class
        # embedding comes after it, so those are never trimmed.
        text = self.config.get("model", {}).get("text", {})
        return self.config["tokenizer"] != "siglip" and text.get("causal", True) and text.get("kind") != "coca"

    def detect_image(self, image: Image.Image, texts: Sequence[str]) -> np.ndarray:
        """Probabilities (1, len(texts)) that each caption describes the image, as `clip.CLIP.detect_image`."""
        image_features = _normalise(self.encode_image(self.preprocess(image)))
        text_features = _normalise(self.encode_text(self.tokenize(texts)))
        return self.probabilities(image_features @ text_features.T)

    def probabilities(self, cosines: np.ndarray) -> np.ndarray:
        """As `clip.CLIP.probabilities`: sigmoid(scale * cos + bias) per name for an export with a bias, else a
        softmax of scale * cos over the names."""
        if self.independent:
            return _sigmoid(self.logit_scale * cosines + self.logit_bias)
        return _softmax(self.logit_scale * cosines)

    def class_embeddings(self, labels: Sequence[str], templates: str = "") -> np.ndarray:
        """(len(labels), dim) unit vectors, each the mean of its normalised template embeddings, renormalised."""
        from utils.prompts import load_templates

        prompts = load_templates(templates, "cn" if self.config["tokenizer"] == "bert" else "en")
        rows = [_normalise(self.encode_text(self.tokenize([t.replace("{c}", name) for t in prompts]))).mean(0)
                for name in labels]
        return _normalise(np.stack(rows))

    def classify(self, image: Image.Image, class_embeddings: np.ndarray) -> np.ndarray:
        """Probabilities (1, classes) for the classes of `class_embeddings()`, as detect_image's."""
        image_features = _normalise(self.encode_image(self.preprocess(image)))
        return self.probabilities(image_features @ class_embeddings.T)
