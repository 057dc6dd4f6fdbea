"""eval.py --eval_type wise_ft: sweep WiSE-FT's alpha on the fine-tuning val set (and a control set), choose one,
save its weights, the table and the plot."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

from utils.checks import is_weight_name
from utils.errors import UserError
from utils.files import atomic_savefig, atomic_write_bytes, check_writable, refuse_existing
from utils.finetune.wise_ft import check_alphas, check_pair, interpolate
from utils.tokenizer import copy_tokenizer_files, files_beside, reads_files_beside
from utils.weights.arch import save_weights
from utils.weights.load import preprocess_of

CONTROL_TYPES = ("", "retrieval", "zeroshot")
OUTPUT_FILES = {"weights": "wise_ft_weights.pth", "results": "wise_ft_results.json", "plot": "wise_ft.png"}
RULE = ("the alpha with the best mean of the fine-tuning set's r_mean and the control score (without a control "
        "set: the best r_mean); ties go to the smaller alpha, which keeps more of the start")


def output_paths(save_dir: str | Path) -> dict[str, Path]:
    return {kind: Path(save_dir) / name for kind, name in OUTPUT_FILES.items()}


def check_sweep(cfg: Mapping) -> tuple[list[float], dict[str, Path]]:
    """Every setting of the sweep, before any model is built: (alphas, output paths)."""
    alphas = check_alphas(cfg["wise_ft_alphas"], "wise_ft_alphas")
    if not cfg["wise_ft_start_path"]:
        raise UserError("wise_ft_start_path is empty: set it to the weights before fine-tuning (model_path holds "
                        "the fine-tuned ones)")
    for setting in ("wise_ft_start_path", "model_path"):
        if not cfg[setting] or not (Path(cfg[setting]).exists() or is_weight_name(cfg[setting])):
            raise UserError(f"{setting} {cfg[setting]!r} does not exist; the sweep blends two weight files: "
                            "wise_ft_start_path (before fine-tuning) and model_path (after)")
    if cfg["control_type"] not in CONTROL_TYPES:
        raise UserError(f"control_type {cfg['control_type']!r} is not one of \"\" (none), retrieval, zeroshot")
    if cfg["control_type"] and not cfg["control_datasets_path"]:
        raise UserError(f"control_type {cfg['control_type']} needs control_datasets_path (and, for retrieval, "
                        "control_json_path)")
    if cfg["control_type"] == "retrieval" and not cfg["control_json_path"]:
        raise UserError("control_type retrieval needs control_json_path, the control set's caption file")
    paths = output_paths(cfg["wise_ft_save_dir"])
    refuse_existing(paths.values(), cfg["overwrite"], "another wise_ft_save_dir")
    check_writable(Path(cfg["wise_ft_save_dir"]), "wise_ft_save_dir")
    return alphas, paths


def choose(rows: Sequence[dict]) -> dict:
    """The row RULE picks: the best `selection` score, the smaller alpha on a tie."""
    return max(rows, key=lambda row: (row["selection"], -row["alpha"]))


def format_sweep(rows: Sequence[dict], control_label: str | None) -> str:
    header = f"{'alpha':>6}{'fine-tune r_mean':>18}"
    if control_label:
        header += f"{control_label:>18}{'mean':>8}"
    lines = [header]
    for row in rows:
        line = f"{row['alpha']:>6.2f}{row['val_score']:>18.2f}"
        if control_label:
            line += f"{row['control_score']:>18.2f}{row['selection']:>8.2f}"
        lines.append(line)
    return "\n".join(lines)


def plot_sweep(rows: Sequence[dict], control_label: str | None, chosen: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [row["alpha"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(alphas, [row["val_score"] for row in rows], "o-", label="fine-tuning set r_mean")
    if control_label:
        ax.plot(alphas, [row["control_score"] for row in rows], "s-", label=f"control {control_label}")
    ax.axvline(chosen, color="grey", linestyle="--", label=f"chosen alpha {chosen:g}")
    ax.set_xlabel("alpha (0: before fine-tuning, 1: fine-tuned)")
    ax.set_ylabel("%")
    ax.set_title("WiSE-FT sweep")
    ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, path)


class _Control:
    """The control set encoded by one model: its score in % and its metrics (eval.py's code paths)."""

    def __init__(self, cfg: Mapping):
        from utils.data.preflight import preflight
        from utils.eval.zeroshot import zeroshot_set

        self.kind = cfg["control_type"]
        self.cfg = cfg
        self.root = Path(cfg["control_datasets_path"])
        if self.kind == "retrieval":
            self.entries = preflight(cfg["control_json_path"], self.root, cfg["num_workers"], cfg["skip_bad_samples"],
                                     columns=(cfg["csv_image_column"], cfg["csv_caption_column"]))
            self.label = "control r_mean"
        else:
            self.names, self.entries, _ = zeroshot_set({**cfg, "datasets_path": cfg["control_datasets_path"],
                                                        "datasets_val_json_path": cfg["control_json_path"]})
            self.label = "control acc1"

    def __call__(self, clip) -> tuple[float, dict]:
        from utils.eval.encode import encode_images, encode_set, score
        from utils.eval.zeroshot import zeroshot_metrics
        from utils.prompts import class_embeddings, load_templates

        cfg = self.cfg
        if self.kind == "retrieval":
            metrics = score(self.entries, *encode_set(clip.net, clip.pipeline, self.entries, self.root,
                                                      clip.tokenizer, cfg["batch_size"], cfg["num_workers"]),
                            device=clip.device)
            return metrics["r_mean"], metrics
        templates = load_templates(cfg["templates"], "cn" if clip.net.config.text.is_bert else "en")
        images = encode_images(clip.pipeline, self.entries, self.root, cfg["batch_size"], cfg["num_workers"])
        classes = class_embeddings(clip.net.encode_text, clip.tokenizer, self.names, templates, clip.device)
        labels = torch.tensor([e["label"] for e in self.entries])
        metrics = zeroshot_metrics(images.float() @ classes.float().T, labels)["metrics"]
        return 100 * metrics["acc1"], metrics


def run_sweep(cfg: dict) -> dict:
    """eval.py --eval_type wise_ft: evaluate the blend at every alpha on the fine-tuning val set (and the control
    set), print the table, plot it, and save the chosen alpha's weights. Returns the results written to JSON.

    The feature cache is not used: blended weights exist only in memory, so there is no file whose bytes could
    key them, and the two endpoints are cheap next to the blends."""
    from utils.data.preflight import preflight
    from utils.device import loader_workers
    from utils.eval.encode import encode_set, score
    from clip import CLIP
    from utils.weights.load import read_checkpoint
    from utils.weights.pretrained import locate

    alphas, paths = check_sweep(cfg)
    cfg = {**cfg, "num_workers": loader_workers(cfg["num_workers"])}
    root = Path(cfg["datasets_path"])
    entries = preflight(cfg["datasets_val_json_path"], root, cfg["num_workers"], cfg["skip_bad_samples"],
                        columns=(cfg["csv_image_column"], cfg["csv_caption_column"]))
    control = _Control(cfg) if cfg["control_type"] else None
    started = time.time()
    names = (str(cfg["wise_ft_start_path"]), str(cfg["model_path"]))
    start = read_checkpoint(locate(cfg["wise_ft_start_path"], cfg["phi"]).path).state_dict
    finetuned = read_checkpoint(locate(cfg["model_path"], cfg["phi"]).path).state_dict
    check_pair(start, finetuned, names)
    clip = CLIP.from_config(cfg)  # the fine-tuned weights, checked against phi as eval.py checks them
    rows = []
    for alpha in alphas:
        clip.net.load_state_dict(interpolate(start, finetuned, alpha, names), strict=True)
        val = score(entries, *encode_set(clip.net, clip.pipeline, entries, root, clip.tokenizer, cfg["batch_size"],
                                         cfg["num_workers"]), device=clip.device)
        row = {"alpha": alpha, "val_score": val["r_mean"], "val": val}
        if control:
            row["control_score"], row["control"] = control(clip)
            row["selection"] = (row["val_score"] + row["control_score"]) / 2
        else:
            row["selection"] = row["val_score"]
        rows.append(row)
        extra = f", {control.label} {row['control_score']:.2f}" if control else ""
        print(f"alpha {alpha:g}: fine-tune r_mean {row['val_score']:.2f}{extra}", flush=True)
    label = control.label if control else None
    chosen = choose(rows)["alpha"]
    print(format_sweep(rows, label))
    print(f"chosen alpha {chosen:g}: {RULE}")
    save_weights(interpolate(start, finetuned, chosen, names), paths["weights"], clip.net.config, clip.phi,
                 preprocess_of(clip.net), getattr(clip.tokenizer, "language", None))
    if reads_files_beside(clip.net.config.text):  # its tokenizer files go beside it, as train.py's
        copy_tokenizer_files(files_beside(clip.weights_path), paths["weights"].parent)
    plot_sweep(rows, label, chosen, paths["plot"])
    results = {"start": names[0], "finetuned": names[1], "phi": clip.phi, "dataset": cfg["datasets_val_json_path"],
               "control_type": cfg["control_type"], "control": (cfg["control_json_path"] or cfg["control_datasets_path"])
               if control else "", "rows": rows, "chosen_alpha": chosen, "rule": RULE,
               "weights": str(paths["weights"]), "precision": clip.precision, "seconds": time.time() - started}
    atomic_write_bytes(json.dumps(results, indent=2).encode("utf-8"), paths["results"])
    print(f"chosen weights written to {paths['weights']}, table to {paths['results']}, plot to {paths['plot']}")
    return results
