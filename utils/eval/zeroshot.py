"""Zero-shot classification with CLIP_benchmark's conventions: classes from an image-folder tree (or labelled
JSON), top-k accuracy, mean per-class recall and the confusion plot. The class embeddings are utils/prompts.py's."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from utils.data.images import IMAGE_SUFFIXES, image_files
from utils.data.preflight import image_problem, read_annotations
from utils.errors import UserError

if TYPE_CHECKING:
    import torch


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


def zeroshot_set(cfg: dict) -> tuple[list[str], list[dict], Path | None]:
    """Class names, entries and the JSON file (None for an image-folder tree) of a zero-shot evaluation: the
    labelled JSON at datasets_val_json_path when it exists and carries "label"s, else the folder tree."""
    json_path = Path(cfg["datasets_val_json_path"])
    root = Path(cfg["datasets_path"])
    if json_path.is_file():
        raw = read_annotations(json_path)
        if raw and isinstance(raw[0], dict) and "label" in raw[0]:
            names, entries = labelled_json(raw, json_path, cfg["classnames"])
            missing = [e["image"] for e in entries if image_problem(root / e["image"])]
            if missing and not cfg["skip_bad_samples"]:
                raise UserError(f"{json_path}: {len(missing)} images are missing or unreadable under {root}, e.g. "
                                f"{missing[0]}; fix them or set skip_bad_samples=True")
            missing = set(missing)
            return names, [e for e in entries if e["image"] not in missing], json_path
    names, entries = folder_dataset(root, cfg["classnames"])
    return names, entries, None


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

    from utils.files import atomic_savefig

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
