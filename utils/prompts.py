"""Prompt templates for zero-shot classification and the prompt-ensembled class embeddings built from them.

torch is imported where it is used: the ONNX predictor reads its prompt templates here without it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from utils.errors import UserError

if TYPE_CHECKING:
    import torch

MODEL_DATA = Path(__file__).resolve().parents[1] / "model_data"
# A language's default set: OpenAI's 80 ImageNet templates; for Chinese, Chinese-CLIP's 80 (its
# cn_clip/eval/imagenet_zeroshot_templates.py, MIT licence), `cn` kept as the name this project gave it first.
# This project's earlier 18 Chinese templates stay in model_data/templates_cn.json, for `templates` to name.
DEFAULT_TEMPLATES = {"en": MODEL_DATA / "templates_imagenet_en.json", "zh": MODEL_DATA / "templates_zh.json",
                     "cn": MODEL_DATA / "templates_zh.json"}


def template_language(spec: str, chinese_tower: bool) -> str:
    """The language of the templates `spec` names: a language given as `templates` (zh, en), else the tower's own
    (zh for the Chinese BERT towers, en for the others, multilingual ones included)."""
    if spec in DEFAULT_TEMPLATES:
        return "zh" if spec == "cn" else spec
    return "zh" if chinese_tower else "en"
# Said beside a SigLIP model's scores (predict, predict_onnx, the web page), which a reader would otherwise take for
# shares of 1: with a logit bias each name gets its own sigmoid(scale * cos + bias). Accuracy is the argmax either way.
INDEPENDENT = "independent probabilities: one sigmoid per name, as the model was trained; they do not sum to 1"


def load_templates(spec: str, language: str = "en") -> list[str]:
    """Prompt templates with {c} for the class name: a JSON list file, a single template, a language (`zh`, `en`)
    for its default set, or "" for `language`'s (OpenAI's 80 ImageNet templates; Chinese-CLIP's 80)."""
    if not spec or spec in DEFAULT_TEMPLATES:
        spec = str(DEFAULT_TEMPLATES[spec or language])
    if spec.endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"templates file {path} does not exist")
        try:
            templates = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"templates file {path} is not valid JSON ({e})") from e
        if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
            raise UserError(f"templates file {path} must hold a non-empty JSON list of strings")
    else:
        templates = [spec]
    missing = [t for t in templates if "{c}" not in t]
    if missing:
        raise UserError(f"template {missing[0]!r} has no {{c}} where the class name goes"
                        + (f" ({len(missing)} templates lack it)" if len(missing) > 1 else ""))
    return templates


def class_embeddings(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer: Callable, classnames: list[str],
                     templates: list[str], device: torch.device) -> torch.Tensor:
    """(classes, dim) unit vectors: per class, the mean of its L2-normalised template embeddings, renormalised
    (the ensembling of OpenAI's zero-shot notebook)."""
    import torch
    import torch.nn.functional as F

    rows = []
    with torch.no_grad():
        for name in classnames:
            tokens = tokenizer([t.replace("{c}", name) for t in templates]).to(device)
            rows.append(F.normalize(F.normalize(encode_text(tokens).float(), dim=-1).mean(0), dim=0))
    return torch.stack(rows)
