"""Zero-shot classification with CLIP_benchmark's conventions: classes from an image-folder tree (or labelled
JSON), prompt-ensembled class embeddings, top-k accuracy and mean per-class recall.

torch is imported where it is used: the ONNX predictor reads its prompt templates here without it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .errors import UserError
from .images import IMAGE_SUFFIXES, image_files

if TYPE_CHECKING:
    import torch

MODEL_DATA = Path(__file__).resolve().parents[1] / "model_data"
DEFAULT_TEMPLATES = {"en": MODEL_DATA / "templates_imagenet_en.json", "cn": MODEL_DATA / "templates_cn.json"}


def load_templates(spec: str, language: str = "en") -> list[str]:
    """Prompt templates with {c} for the class name: a JSON list file, a single template, or "" for the
    language's default set (OpenAI's 80 ImageNet templates; a Chinese set)."""
    if not spec:
        spec = str(DEFAULT_TEMPLATES[language])
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


def read_classnames(path: str, expected: int | None = None) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"classnames file {file} does not exist")
    names = [line.strip() for line in file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if expected is not None and len(names) != expected:
        raise UserError(f"classnames file {file} has {len(names)} names for {expected} classes; give one name per "
                        "class, in sorted-folder (or label) order")
    if not names:
        raise UserError(f"classnames file {file} holds no names")
    return names


def folder_dataset(root: str | Path, classnames: str = "") -> tuple[list[str], list[dict]]:
    """(class names, entries {"image": path relative to root, "label": int}) of an image-folder tree."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"datasets_path {root} does not exist; point it at a folder with one subfolder per class")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"{root} has no class subfolders; zero-shot evaluation needs one folder of images per class")
    entries = []
    for label, folder in enumerate(folders):
        entries += [{"image": p.relative_to(root).as_posix(), "label": label} for p in image_files(folder)]
    if not entries:
        raise UserError(f"the class folders under {root} hold no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    names = read_classnames(classnames, len(folders)) if classnames else [f.name.replace("_", " ") for f in folders]
    return names, entries


def labelled_json(entries: Sequence[dict], json_path: str | Path, classnames: str) -> tuple[list[str], list[dict]]:
    """Class names and entries of the original's JSON with an integer "label" per entry."""
    if not classnames:
        raise UserError(f"{json_path} gives labels as numbers: set classnames to a file with one name per label")
    names = read_classnames(classnames)
    labelled = []
    for i, entry in enumerate(entries):
        label = entry.get("label")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(names):
            raise UserError(f"{json_path}, entry {i}: \"label\" must be an integer in [0, {len(names)}) "
                            f"(the classnames file has {len(names)} names), got {label!r}")
        labelled.append({"image": entry["image"], "label": label})
    return names, labelled


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


def zeroshot_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """acc1, acc5 (with at least 5 classes), mean_per_class_recall (balanced accuracy, over classes that have
    images), per-class recall and counts, and the confusion matrix (rows: true class, columns: predicted)."""
    import torch

    n_classes = logits.shape[1]
    labels = labels.long()
    top = logits.topk(min(5, n_classes), dim=1).indices
    correct = top == labels[:, None]
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    confusion.index_put_((labels, top[:, 0]), torch.ones_like(labels), accumulate=True)
    counts = confusion.sum(1)
    recall = confusion.diag().float() / counts.clamp(min=1)
    metrics = {"acc1": float(correct[:, 0].float().mean())}
    if n_classes >= 5:
        metrics["acc5"] = float(correct.any(1).float().mean())
    metrics["mean_per_class_recall"] = float(recall[counts > 0].mean())
    return {"metrics": metrics, "per_class_recall": recall.tolist(), "per_class_count": counts.tolist(),
            "confusion": confusion.tolist()}


def format_classes(classnames: list[str], result: dict) -> str:
    width = max(10, *(len(n) for n in classnames)) + 2
    lines = [f"{'class':<{width}}{'images':>8}{'recall':>9}"]
    for name, count, recall in zip(classnames, result["per_class_count"], result["per_class_recall"]):
        lines.append(f"{name:<{width}}{count:>8}{100 * recall:>8.2f}%")
    return "\n".join(lines)


def plot_confusion(classnames: list[str], confusion: list[list[int]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import atomic_savefig

    size = min(4 + 0.35 * len(classnames), 30)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classnames)), classnames, rotation=90)
    ax.set_yticks(range(len(classnames)), classnames)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(classnames) <= 30:
        for i, row in enumerate(confusion):
            for j, value in enumerate(row):
                if value:
                    ax.text(j, i, str(value), ha="center", va="center", fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path)
