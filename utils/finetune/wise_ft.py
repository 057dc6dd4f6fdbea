"""WiSE-FT (Wortsman et al., 2022): blend the weights before and after fine-tuning,
theta = (1 - alpha) * theta_start + alpha * theta_finetuned, and sweep alpha to keep what the start knew.

`interpolate` is the blend (train.py's `wise_ft_alpha` uses it too); `run_sweep` is `eval.py --eval_type wise_ft`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..checkpoint import atomic_save, atomic_savefig, atomic_write_bytes, check_writable
from ..errors import UserError

CONTROL_TYPES = ("", "retrieval", "zeroshot")
OUTPUT_FILES = {"weights": "wise_ft_weights.pth", "results": "wise_ft_results.json", "plot": "wise_ft.png"}
RULE = ("the alpha with the best mean of the fine-tuning set's r_mean and the control score (without a control "
        "set: the best r_mean); ties go to the smaller alpha, which keeps more of the start")


def check_alpha(alpha, setting_name: str) -> float:
    """`alpha` as a float, or a UserError naming `setting_name` when it is not a number from 0 to 1."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise UserError(f"{setting_name} must be a number from 0 (the weights before fine-tuning) to 1 (the "
                        f"fine-tuned weights), got {alpha!r}")
    return float(alpha)


def check_alphas(alphas, setting_name: str) -> list[float]:
    """The distinct alphas of a non-empty list, ascending; a UserError for an empty list or any value outside [0, 1]."""
    if not isinstance(alphas, (list, tuple)) or not alphas:
        raise UserError(f"{setting_name} needs at least one alpha from 0 to 1, e.g. --{setting_name} 0 0.5 1")
    bad = [a for a in alphas if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1]
    if bad:
        raise UserError(f"{setting_name} values must be numbers from 0 (the weights before fine-tuning) to 1 (the "
                        f"fine-tuned weights), got {bad[0]!r}")
    return sorted({float(a) for a in alphas})


def check_pair(start: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
               names: tuple[str, str] = ("start", "finetuned")) -> None:
    """A UserError in one line unless both state dicts hold the same tensors (keys, shapes, float or not) and
    every non-float tensor (a buffer such as position ids) is equal in both, as a blend needs."""
    problems = []
    for title, keys in ((f"only in {names[0]}", [k for k in start if k not in finetuned]),
                        (f"only in {names[1]}", [k for k in finetuned if k not in start])):
        if keys:
            problems.append(f"{len(keys)} keys {title} (first: {', '.join(keys[:3])})")
    shared = [k for k in finetuned if k in start]
    shapes = [f"{k} {tuple(start[k].shape)} vs {tuple(finetuned[k].shape)}" for k in shared
              if start[k].shape != finetuned[k].shape]
    if shapes:
        problems.append(f"{len(shapes)} shapes differ (first: {'; '.join(shapes[:3])})")
    kinds = [k for k in shared if start[k].is_floating_point() != finetuned[k].is_floating_point()]
    if kinds:
        problems.append(f"{len(kinds)} tensors are floating point in one file only (first: {', '.join(kinds[:3])})")
    fixed = [k for k in shared if k not in kinds and not finetuned[k].is_floating_point()
             and start[k].shape == finetuned[k].shape and not torch.equal(start[k].cpu(), finetuned[k].cpu())]
    if fixed:
        problems.append(f"{len(fixed)} integer tensors differ (first: {', '.join(fixed[:3])})")
    if problems:
        raise UserError(f"{names[0]} and {names[1]} are not one architecture before and after fine-tuning: "
                        + "; ".join(problems))


def _blend(start: torch.Tensor, finetuned: torch.Tensor, alpha: float) -> torch.Tensor:
    # The endpoints are copies, not arithmetic: 1 * x + 0 * y turns -0.0 into 0.0 and inf into nan.
    if alpha == 0:
        return start.to(finetuned.device, finetuned.dtype, copy=True)
    if alpha == 1:
        return finetuned.clone()
    # fp16/bf16 weights are blended in fp32 (fp64 stays fp64), then stored in the fine-tuned file's dtype.
    work = torch.promote_types(finetuned.dtype, torch.float32)
    mixed = start.to(finetuned.device, work).mul(1 - alpha).add_(finetuned.to(work), alpha=alpha)
    return mixed.to(finetuned.dtype)


def interpolate(start: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], alpha: float,
                names: tuple[str, str] = ("start", "finetuned")) -> dict[str, torch.Tensor]:
    """(1 - alpha) * start + alpha * finetuned for every floating tensor (keys in the fine-tuned order, on its
    device and in its dtype); non-float tensors must be equal in both and are copied. `names` name the two
    state dicts (their files) in the error raised when they do not match."""
    alpha = check_alpha(alpha, "alpha")
    check_pair(start, finetuned, names)
    return {k: _blend(start[k].detach(), v.detach(), alpha) if v.is_floating_point() else v.detach().clone()
            for k, v in finetuned.items()}


def output_paths(save_dir: str | Path) -> dict[str, Path]:
    return {kind: Path(save_dir) / name for kind, name in OUTPUT_FILES.items()}


def check_sweep(cfg: Mapping) -> tuple[list[float], dict[str, Path]]:
    """Every setting of the sweep, before any model is built: (alphas, output paths)."""
    alphas = check_alphas(cfg["wise_ft_alphas"], "wise_ft_alphas")
    if not cfg["wise_ft_start_path"]:
        raise UserError("wise_ft_start_path is empty: set it to the weights before fine-tuning (model_path holds "
                        "the fine-tuned ones)")
    for setting in ("wise_ft_start_path", "model_path"):
        if not cfg[setting] or not Path(cfg[setting]).exists():
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
    existing = [p for p in paths.values() if p.exists()]
    if existing and not cfg["wise_ft_overwrite"]:
        raise UserError(f"{existing[0]} already exists; choose another wise_ft_save_dir or set wise_ft_overwrite=true")
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
        from ..eval_run import zeroshot_set
        from ..preflight import preflight

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
        from ..evaluation import encode_images, encode_set, score
        from ..zeroshot import class_embeddings, load_templates, zeroshot_metrics

        cfg = self.cfg
        if self.kind == "retrieval":
            metrics = score(self.entries, *encode_set(clip.net, self.entries, self.root, clip.transform,
                                                      clip.tokenizer, cfg["batch_size"], cfg["num_workers"],
                                                      clip.device), device=clip.device)
            return metrics["r_mean"], metrics
        templates = load_templates(cfg["templates"], "cn" if clip.net.config.text.is_bert else "en")
        images = encode_images(clip.net, self.entries, self.root, clip.transform, cfg["batch_size"],
                               cfg["num_workers"], clip.device)
        classes = class_embeddings(clip.net.encode_text, clip.tokenizer, self.names, templates, clip.device)
        labels = torch.tensor([e["label"] for e in self.entries])
        metrics = zeroshot_metrics(images.float() @ classes.float().T, labels)["metrics"]
        return 100 * metrics["acc1"], metrics


def run_sweep(cfg: dict) -> dict:
    """eval.py --eval_type wise_ft: evaluate the blend at every alpha on the fine-tuning val set (and the control
    set), print the table, plot it, and save the chosen alpha's weights. Returns the results written to JSON.

    The feature cache is not used: blended weights exist only in memory, so there is no file whose bytes could
    key them, and the two endpoints are cheap next to the blends."""
    from ..device import loader_workers
    from ..eval_run import load_clip
    from ..evaluation import encode_set, score
    from ..preflight import preflight
    from ..weights import read_checkpoint

    alphas, paths = check_sweep(cfg)
    cfg = {**cfg, "num_workers": loader_workers(cfg["num_workers"])}
    root = Path(cfg["datasets_path"])
    entries = preflight(cfg["datasets_val_json_path"], root, cfg["num_workers"], cfg["skip_bad_samples"],
                        columns=(cfg["csv_image_column"], cfg["csv_caption_column"]))
    control = _Control(cfg) if cfg["control_type"] else None
    started = time.time()
    names = (str(cfg["wise_ft_start_path"]), str(cfg["model_path"]))
    start = read_checkpoint(cfg["wise_ft_start_path"]).state_dict
    finetuned = read_checkpoint(cfg["model_path"]).state_dict
    check_pair(start, finetuned, names)
    clip = load_clip(cfg)  # the fine-tuned weights, checked against phi as eval.py checks them
    rows = []
    for alpha in alphas:
        clip.net.load_state_dict(interpolate(start, finetuned, alpha, names), strict=True)
        val = score(entries, *encode_set(clip.net, entries, root, clip.transform, clip.tokenizer, cfg["batch_size"],
                                         cfg["num_workers"], clip.device), device=clip.device)
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
    atomic_save(interpolate(start, finetuned, chosen, names), paths["weights"])
    plot_sweep(rows, label, chosen, paths["plot"])
    results = {"start": names[0], "finetuned": names[1], "phi": clip.phi, "dataset": cfg["datasets_val_json_path"],
               "control_type": cfg["control_type"], "control": (cfg["control_json_path"] or cfg["control_datasets_path"])
               if control else "", "rows": rows, "chosen_alpha": chosen, "rule": RULE,
               "weights": str(paths["weights"]), "precision": clip.precision, "seconds": time.time() - started}
    atomic_write_bytes(json.dumps(results, indent=2).encode("utf-8"), paths["results"])
    print(f"chosen weights written to {paths['weights']}, table to {paths['results']}, plot to {paths['plot']}")
    return results
