"""Inference wrapper in the original repo's shape: `CLIP(**overrides).detect_image(image, texts)`."""
from __future__ import annotations

import importlib.util
from typing import Sequence

import utils  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nets import MODEL_CONFIGS, build_model, get_config
from nets.fast import accelerate
from nets.ort import OnnxRuntime, auto_runtime
from utils.data.images import eval_transform
from utils.data.pictures import ImagePipeline
from utils.checks import RUNTIME_NAMES
from utils.device import PRECISIONS, resolve_device, resolve_precision
from utils.errors import UserError
from utils.tokenizer import DEFAULT_BERT_VOCAB_PATH, text_tokenizer
from utils.weights.download import cache_dir
from utils.weights.load import load, preprocess_of, recorded_language
from utils.weights.memory import ensure_fits, parameter_count


class CLIP(object):
    _defaults = {
        # A weight file or folder, or a name: a pretrained tag of phi ('openai', 'laion2b_s34b_b79k'),
        # hf-hub:ORG/NAME or an http(s) URL, downloaded once (README, "Weights"); '' = random weights.
        "model_path": "openai",
        # A name from nets/configs.py MODEL_CONFIGS, or 'auto' to read the architecture from the weights.
        "phi": "openai/VIT-B-32",
        # Letterbox keeps the whole image on a grey canvas; otherwise the weights' own resize (OpenAI's resize +
        # centre crop for most, a squash for some), with their mean and std.
        "letterbox_image": False,
        # None: use CUDA when available.
        "cuda": None,
        # 'fp32', 'fp16' (CUDA) or 'bf16'; None: fp16 on CUDA, fp32 on the CPU.
        "precision": None,
        # WordPiece vocabulary for the Chinese BERT towers.
        "bert_vocab_path": str(DEFAULT_BERT_VOCAB_PATH),
        # open_image decodes JPEGs only as large as the model's input needs (several times faster on photos);
        # False decodes in full, for numbers reproduced bit for bit.
        "fast_decode": True,
        # On the CPU, linear layers run through oneDNN (nets/fast.py): about twice as fast, features within
        # 1e-5 of the plain PyTorch path; False keeps the plain path.
        "onednn": True,
        # "torch", or "onnxruntime": on the CPU in fp32, the towers run in onnxruntime from an ONNX export made once
        # per weights and kept in the download cache (nets/ort.py); faster on CPUs where onnxruntime's matmuls beat
        # oneDNN's (AVX2; `predict.py --mode fps` says), features within 1e-4. PyTorch answers a tower's first
        # calls while its export is looked up in a thread; the first run ever exports it (tens of seconds, ViT-B).
        # "auto": onnxruntime on an AVX2 CPU without AVX-512 in fp32, else torch (nets/ort.py auto_runtime), said.
        "runtime": "torch",
        # NLLB-CLIP: the captions' FLORES-200 language code ("fra_Latn", ...), each caption's first token; "" or None =
        # the one recorded with the weights (a run trained with text_language), else the tokenizer's default,
        # eng_Latn. Other models take none.
        "text_language": None,
    }

    @classmethod
    def get_defaults(cls, name: str):
        if name not in cls._defaults:
            raise UserError(f"unrecognised attribute name {name!r}; known: {', '.join(cls._defaults)}")
        return cls._defaults[name]

    # The config block's name of each attribute, where it differs (the scripts say Cuda, after the original).
    _config_names = {"cuda": "Cuda"}

    @classmethod
    def from_config(cls, cfg: dict, **overrides) -> "CLIP":
        """The model of a script's config block (predict.py's, eval.py's, ...): each attribute the block sets,
        then `overrides` (an export's cuda=False, say); what it leaves out keeps its default."""
        given = {name: cfg[cls._config_names.get(name, name)] for name in cls._defaults
                 if cls._config_names.get(name, name) in cfg}
        return cls(**{**given, **overrides})

    def __init__(self, **kwargs):
        for name, value in {**self._defaults, **kwargs}.items():
            self.get_defaults(name)
            setattr(self, name, value)
        self.generate()

    # Built outside inference mode whatever the caller's: inference tensors keep no version counter, which the
    # packed weights (nets/fast.py) and the runtime's fingerprint (nets/ort.py) read to see the weights change.
    @torch.inference_mode(False)
    def generate(self) -> None:
        if self.runtime not in RUNTIME_NAMES:
            raise UserError(f"runtime {self.runtime!r} is not one of {', '.join(RUNTIME_NAMES)}")
        if self.runtime == "onnxruntime":
            if importlib.util.find_spec("onnxruntime") is None:
                raise UserError("runtime='onnxruntime' needs onnxruntime: pip install onnxruntime")
        self.weights_path = None  # the local file behind a weight name, for caches keyed by the weights' bytes
        self.device = resolve_device(self.cuda)
        self.precision = resolve_precision(self.precision, self.device)
        runtime = self.runtime
        if runtime == "auto":
            runtime, why = auto_runtime(self.device, self.precision)
            print(f"runtime auto: {runtime} ({why})")
        if self.device.type == "cuda" and self.phi in MODEL_CONFIGS:  # refused before the weights are read to RAM
            ensure_fits(parameter_count(get_config(self.phi)) * (torch.finfo(PRECISIONS[self.precision]).bits // 8),
                        f"{self.phi} on {self.device}", self.device)
        if self.model_path:
            self.net, self.phi, self.weights_path = load(self.model_path, self.phi)
        elif self.phi == "auto":
            raise UserError("phi='auto' reads the architecture from model_path, which is empty")
        else:  # random weights: refused in one line where they cannot fit, as a load is
            ensure_fits(parameter_count(get_config(self.phi)) * 4, f"{self.phi}'s weights")
            self.net = build_model(get_config(self.phi))
        config = self.net.config
        language = self.text_language or recorded_language(self.net)
        if language and not self.text_language:
            print(f"text_language {language}: recorded with the weights (set text_language to ask in another)")
        self.tokenizer = text_tokenizer(config.text, self.weights_path, self.bert_vocab_path, language)
        # The weights' record (letterbox_image=True wins over its resize mode): transform.preprocess.
        self.transform = eval_transform(config.vision.image_size, self.letterbox_image, preprocess_of(self.net))
        if self.device.type == "cuda":  # the GPU copy of the weights, refused in one line when it cannot fit
            size = torch.finfo(PRECISIONS[self.precision]).bits // 8
            ensure_fits(sum(t.numel() for t in self.net.state_dict().values()) * size, f"{self.phi} on {self.device}",
                        self.device, announce=self.phi not in MODEL_CONFIGS)  # a table phi said it above
        self.net = self.net.to(self.device, PRECISIONS[self.precision]).eval()
        if self.onednn and self.device.type == "cpu":
            accelerate(self.net)
        if runtime == "onnxruntime":
            if self.device.type == "cpu" and self.precision == "fp32":
                self.net.runtime = OnnxRuntime(cache_dir() / "onnx", self.tokenizer.pad_token_id)
            else:
                print(f"runtime onnxruntime runs fp32 on the CPU; {self.precision} on {self.device} runs in PyTorch")
        # The weights are cast to the precision, so the pipeline needs no autocast region (dtype float32).
        self.pipeline = ImagePipeline(lambda pixels: self.net.encode_image(pixels), self.transform, self.device,
                                      fast_decode=self.fast_decode)

    def open_image(self, source) -> Image.Image:
        """The image at a path (or in bytes, a binary file or an Image.open not yet decoded), upright RGB, decoded
        as large as this model needs."""
        return self.pipeline.open(source)

    def preprocess(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        return self.pipeline.pixels(images)

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    @torch.no_grad()
    def detect_image(self, image: Image.Image, texts: Sequence[str]) -> np.ndarray:
        """Probabilities (1, len(texts)) that each caption describes the image: a softmax over the captions, or for a
        model with a logit bias (SigLIP) an independent sigmoid per caption, as it was trained."""
        image_features, text_features = self.net(self.preprocess(image).to(self.device),
                                                 self.tokenize(texts).to(self.device))[:2]
        return self.probabilities(self.net.logits(image_features, text_features)).cpu().numpy()

    @property
    def independent(self) -> bool:
        """Whether the probabilities are independent sigmoids (a model with a logit bias, SigLIP's), which need not
        sum to 1, rather than a softmax over the captions or classes."""
        return self.net.logit_bias is not None

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities of `net.logits`, as the weights were trained: sigmoids with a bias, else a softmax."""
        return logits.sigmoid() if self.independent else logits.softmax(dim=-1)

    @torch.no_grad()
    def class_embeddings(self, labels: Sequence[str], templates: str = "") -> torch.Tensor:
        """(len(labels), dim) unit vectors, each the ensemble of its prompt templates (utils/prompts.py)."""
        from utils.prompts import class_embeddings, load_templates

        language = "cn" if self.net.config.text.is_bert else "en"
        return class_embeddings(self.net.encode_text, self.tokenizer, list(labels), load_templates(templates, language),
                                self.device)

    @torch.no_grad()
    def classify(self, image: Image.Image, class_embeddings: torch.Tensor) -> np.ndarray:
        """Probabilities (1, classes) for the classes of `class_embeddings()`, as detect_image's for captions."""
        image_features = F.normalize(self.net.encode_image(self.preprocess(image).to(self.device)).float(), dim=-1)
        return self.probabilities(self.net.logits(image_features, class_embeddings)).cpu().numpy()

    @torch.no_grad()
    def detect_image_for_eval(self, images=None, texts=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Unnormalised features of `images` (PIL images or a preprocessed batch) and `texts` (strings)."""
        image_features = text_features = None
        if images is not None:
            pixels = images if isinstance(images, torch.Tensor) else self.preprocess(images)
            image_features = self.net.encode_image(pixels.to(self.device))
        if texts is not None:
            tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
            text_features = self.net.encode_text(tokens.to(self.device))
        return image_features, text_features
