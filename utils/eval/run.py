"""What eval.py does: load, encode (or reuse cached features), score, print and save."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from clip import CLIP
from utils.data.preflight import preflight
from utils.device import loader_workers
from utils.errors import UserError
from utils.eval.encode import encode_images, encode_set, score
from utils.eval.feature_cache import cache_key, load_features, save_features
from utils.eval.settings import EVAL_TYPES
from utils.eval.zeroshot import format_classes, plot_confusion, zeroshot_metrics, zeroshot_set
from utils.files import atomic_write_bytes, check_writable, output_name, refuse_existing
from utils.metrics import small_val_warning
from utils.prompts import class_embeddings, load_templates, template_language

RECALL_KEYS = ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean")


def format_table(metrics: dict) -> str:
    rows = [("image -> text", "txt"), ("text -> image", "img")]
    lines = [f"{'retrieval':<15}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean':>8}{'mean rank':>11}{'median rank':>13}"]
    for title, p in rows:
        lines.append(f"{title:<15}{metrics[p + '_r1']:>8.2f}{metrics[p + '_r5']:>8.2f}{metrics[p + '_r10']:>8.2f}"
                     f"{metrics[p + '_r_mean']:>8.2f}{metrics[p + '_mean_rank']:>11.2f}"
                     f"{metrics[p + '_median_rank']:>13.1f}")
    lines.append(f"{'r_mean':<15}{metrics['r_mean']:>8.2f}")
    return "\n".join(lines)


def counted(n: int, one: str, many: str = "") -> str:
    """"1 template", "80 templates"."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def default_output(model_path: str, dataset: str, task: str = "eval") -> Path:
    return Path("logs") / f"{task}_{output_name(model_path, dataset)}.json"


def run_eval(cfg: dict) -> dict:
    if cfg["eval_type"] not in EVAL_TYPES:
        raise UserError(f"eval_type {cfg['eval_type']!r} is not one of {', '.join(EVAL_TYPES)}")
    if cfg["eval_type"] == "zeroshot":
        return run_zeroshot(cfg)
    if cfg["eval_type"] == "wise_ft":
        from utils.eval.wise_ft import run_sweep

        return run_sweep(cfg)
    return run_retrieval(cfg)


def _cached(cfg: dict, clip, json_path, root: Path, entries: list[dict], preprocessing: dict, encode) -> tuple:
    """(image features, text features) from the feature cache, or from `encode()` and then cached."""
    key = None
    if cfg["feature_cache"] and cfg["model_path"]:
        key = cache_key(clip.weights_path, clip.phi, json_path, root, entries, preprocessing)
        features = load_features(cfg["cache_dir"], key)
        if features is not None:
            print(f"using cached features ({cfg['cache_dir']}/{key}.safetensors)")
            return features
    features = encode()
    if key is not None:
        save_features(cfg["cache_dir"], key, *features)
    return features


def run_zeroshot(cfg: dict) -> dict:
    """Zero-shot classification (CLIP_benchmark's metrics and results schema)."""
    cfg = {**cfg, "num_workers": loader_workers(cfg["num_workers"])}
    root = Path(cfg["datasets_path"])
    names, entries, json_path = zeroshot_set(cfg)
    dataset_name = Path(json_path).stem if json_path else root.resolve().name
    output = Path(cfg["output"]) if cfg["output"] else default_output(cfg["model_path"], dataset_name, "zeroshot")
    plot = output.with_name(output.stem + "_confusion.png")
    refuse_existing([output, plot], cfg["overwrite"], "another output")
    check_writable(output.parent, "output")
    if cfg["templates"]:
        load_templates(cfg["templates"])  # a given file reads alike in every language: checked before the model
    started = time.time()
    clip = CLIP.from_config(cfg)
    language = template_language(cfg["templates"], clip.net.config.text.is_bert)
    templates = load_templates(cfg["templates"], language)
    preprocessing = {"task": "zeroshot", "image_size": clip.net.config.vision.image_size,
                     "letterbox": cfg["letterbox_image"], "precision": clip.precision, "classnames": names,
                     "templates": templates, "decode_sides": clip.pipeline.decode_sides}

    def encode() -> tuple:
        images = encode_images(clip.pipeline, entries, root, cfg["batch_size"], cfg["num_workers"])
        return images, class_embeddings(clip.net.encode_text, clip.tokenizer, names, templates, clip.device)

    image_features, classes = _cached(cfg, clip, json_path, root, entries, preprocessing, encode)
    labels = torch.tensor([e["label"] for e in entries])
    result = zeroshot_metrics(image_features.float() @ classes.float().T, labels)
    seconds = time.time() - started
    metrics = result["metrics"]
    print(format_classes(names, result))
    print(", ".join(f"{k} {100 * v:.2f}%" for k, v in metrics.items()))
    print(f"{counted(len(entries), 'image')}, {counted(len(names), 'class', 'classes')}, "
          f"{counted(len(templates), 'template')}, {seconds:.1f} s")
    plot_confusion(names, result["confusion"], plot, f"{dataset_name}: acc1 {100 * metrics['acc1']:.1f}%")
    atomic_write_bytes(json.dumps({
        "dataset": str(json_path or root), "model": cfg["model_path"] or clip.phi, "phi": clip.phi,
        "task": "zeroshot_classification", "metrics": metrics, "language": language,
        "classnames": names, "per_class_recall": result["per_class_recall"], "images": len(entries),
        "templates": len(templates), "seconds": seconds}, indent=2, ensure_ascii=False).encode("utf-8"), output)
    print(f"results written to {output}, confusion matrix to {plot}")
    return metrics


def run_retrieval(cfg: dict) -> dict:
    cfg = {**cfg, "num_workers": loader_workers(cfg["num_workers"])}
    root = Path(cfg["datasets_path"])
    output = Path(cfg["output"]) if cfg["output"] else default_output(cfg["model_path"], Path(cfg["datasets_val_json_path"]).stem)
    refuse_existing([output], cfg["overwrite"], "another output")
    check_writable(output.parent, "output")
    entries = preflight(cfg["datasets_val_json_path"], root, cfg["num_workers"], cfg["skip_bad_samples"],
                        columns=(cfg["csv_image_column"], cfg["csv_caption_column"]))
    if warning := small_val_warning(len(entries), "Evaluate on more images for numbers that compare runs"):
        print(warning)
    started = time.time()
    clip = CLIP.from_config(cfg)
    preprocessing = {"image_size": clip.net.config.vision.image_size, "letterbox": cfg["letterbox_image"],
                     "precision": clip.precision, "context_length": clip.net.config.text.context_length,
                     "decode_sides": clip.pipeline.decode_sides}
    features = _cached(cfg, clip, cfg["datasets_val_json_path"], root, entries, preprocessing,
                       lambda: encode_set(clip.net, clip.pipeline, entries, root, clip.tokenizer, cfg["batch_size"],
                                          cfg["num_workers"]))
    metrics = score(entries, *features, device=clip.device)
    seconds = time.time() - started
    print({k: round(metrics[k], 4) for k in RECALL_KEYS})
    print(format_table(metrics))
    print(f"{counted(len(entries), 'image')}, {counted(int(features[1].shape[0]), 'caption')}, {seconds:.1f} s")
    atomic_write_bytes(json.dumps({"metrics": metrics, "model_path": cfg["model_path"], "phi": clip.phi,
                                  "dataset": cfg["datasets_val_json_path"], "images": len(entries),
                                  "captions": int(features[1].shape[0]), "precision": clip.precision,
                                  "seconds": seconds}, indent=2).encode("utf-8"), output)
    print(f"results written to {output}")
    return metrics
