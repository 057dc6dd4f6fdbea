"""What eval.py does: load, encode (or reuse cached features), score, print and save."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .checkpoint import atomic_write_bytes, check_writable
from .device import loader_workers
from .evaluation import encode_set, score
from .feature_cache import cache_key, load_features, save_features
from .preflight import preflight

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


def default_output(model_path: str, json_path: str) -> Path:
    weights = Path(model_path).stem if model_path else "random"
    return Path("logs") / f"eval_{weights}_{Path(json_path).stem}.json"


def run_eval(cfg: dict) -> dict:
    from clip import CLIP

    cfg = {**cfg, "num_workers": loader_workers(cfg["num_workers"])}
    root = Path(cfg["datasets_path"])
    entries = preflight(cfg["datasets_val_json_path"], root, cfg["num_workers"], cfg["skip_bad_samples"],
                        columns=(cfg["csv_image_column"], cfg["csv_caption_column"]))
    output = Path(cfg["output"]) if cfg["output"] else default_output(cfg["model_path"], cfg["datasets_val_json_path"])
    check_writable(output.parent, "output")
    started = time.time()
    clip = CLIP(model_path=cfg["model_path"], phi=cfg["phi"], letterbox_image=cfg["letterbox_image"],
                cuda=cfg["Cuda"], precision=cfg["precision"], bert_vocab_path=cfg["bert_vocab_path"])
    preprocessing = {"image_size": clip.net.config.vision.image_size, "letterbox": cfg["letterbox_image"],
                     "precision": clip.precision, "context_length": clip.net.config.text.context_length}
    key = None
    features = None
    if cfg["feature_cache"] and cfg["model_path"]:
        key = cache_key(cfg["model_path"], clip.phi, cfg["datasets_val_json_path"], root, entries, preprocessing)
        features = load_features(cfg["cache_dir"], key)
        if features is not None:
            print(f"using cached features ({cfg['cache_dir']}/{key}.safetensors)")
    if features is None:
        features = encode_set(clip.net, entries, root, clip.transform, clip.tokenizer, cfg["batch_size"],
                              cfg["num_workers"], clip.device)
        if key is not None:
            save_features(cfg["cache_dir"], key, *features)
    metrics = score(entries, *features, device=clip.device)
    seconds = time.time() - started
    print({k: round(metrics[k], 4) for k in RECALL_KEYS})
    print(format_table(metrics))
    print(f"{len(entries)} images, {features[1].shape[0]} captions, {seconds:.1f} s")
    atomic_write_bytes(json.dumps({"metrics": metrics, "model_path": cfg["model_path"], "phi": clip.phi,
                                  "dataset": cfg["datasets_val_json_path"], "images": len(entries),
                                  "captions": int(features[1].shape[0]), "precision": clip.precision,
                                  "seconds": seconds}, indent=2).encode("utf-8"), output)
    print(f"results written to {output}")
    return metrics
