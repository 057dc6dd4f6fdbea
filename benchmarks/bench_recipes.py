"""From scratch vs fine-tuning on the toy set: which learning rates work for each (README's table).

    python benchmarks/bench_recipes.py [--pretrained logs/demo_en/last_epoch_weights.pth] [--subset 300]

From scratch is the CPU demo's recipe (`train.py --demo en`); without --pretrained it is trained here first.
Fine-tuning starts from those weights and trains on `--subset` new toy images (generated past the 3000 the
demo saw), as a user fine-tunes on a few hundred of their own, at several learning rates, with and without the
original's batch-size scaling; every row reports val r_mean on the toy val split (500 images, never trained on).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (label, overrides of the fine-tuning run)
FINE_TUNING = [
    ("Init_lr 1e-3 (the from-scratch rate)", dict(Init_lr=1e-3, Min_lr=1e-5, scale_lr=False)),
    ("Init_lr 1e-4", dict(Init_lr=1e-4, Min_lr=1e-6, scale_lr=False)),
    ("Init_lr 1e-4, scale_lr (batch 32: 5e-5)", dict(Init_lr=1e-4, Min_lr=1e-6, scale_lr=True)),
    ("Init_lr 1e-5", dict(Init_lr=1e-5, Min_lr=1e-7, scale_lr=False)),
]


def run(settings: dict) -> tuple[dict, float]:
    """(summary, seconds) of one train.py run with the script's defaults under `settings`."""
    import train
    from utils.config import config_block
    from utils.train.run import run_training

    started = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = run_training({**config_block(vars(train)), **settings})
    return summary, time.time() - started


def evaluate(weights: str, demo: dict, tmp: Path) -> float:
    """eval.py's r_mean of `weights` on the demo's val split."""
    import importlib

    from utils.config import config_block
    from utils.eval.run import run_eval

    eval_script = importlib.import_module("eval")
    settings = {**config_block(vars(eval_script)), "model_path": weights, "phi": demo["phi"], "feature_cache": False,
                "datasets_path": demo["datasets_path"], "datasets_val_json_path": demo["datasets_val_json_path"],
                "output": str(tmp / "start.json")}
    with contextlib.redirect_stdout(io.StringIO()):
        return run_eval(settings)["r_mean"]


def main() -> None:
    import os

    import torch

    from utils.data.toy import make_toy_dataset
    from utils.train.demo import DEMO_PRESETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default="", help="weights of `train.py --demo en` (trained here if empty)")
    parser.add_argument("--subset", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    demo = DEMO_PRESETS["en"]
    make_toy_dataset(demo["datasets_path"])

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pretrained = args.pretrained
        if not pretrained:
            summary, seconds = run({**demo, "save_dir": str(tmp / "scratch")})
            pretrained = str(tmp / "scratch" / "last_epoch_weights.pth")
            print(f"from scratch (demo recipe): r_mean {summary['metrics']['r_mean']:.2f} ({seconds:.0f} s)")
        base = {**demo, "model_path": pretrained, "augment": "light", "datasets_random": True}
        start = evaluate(pretrained, demo, tmp)
        # New images of the toy distribution: image i depends only on (seed, split, i), so indices past the
        # 3000 the demo trained on are pictures it has never seen.
        seen = len(json.loads(Path(demo["datasets_train_json_path"]).read_text(encoding="utf-8")))
        made = make_toy_dataset(tmp / "new", n_train=seen + args.subset, n_val=0)
        toy_root = Path(demo["datasets_path"]).resolve()
        entries = [{**e, "image": os.path.relpath(tmp / "new" / e["image"], toy_root)}
                   for e in json.loads(made["files"]["en_train"].read_text(encoding="utf-8"))[seen:]]
        subset = tmp / "subset.json"
        subset.write_text(json.dumps(entries))
        rows = [("pretrained weights, before fine-tuning", start, 0.0)]
        for label, overrides in FINE_TUNING:
            summary, seconds = run({**base, **overrides, "datasets_train_json_path": str(subset),
                                    "batch_size": args.batch_size, "Epoch": args.epochs, "warmup_ratio": 0.1,
                                    "save_dir": str(tmp / label.split()[1])})
            rows.append((label, summary["metrics"]["r_mean"], seconds))
            print(f"{label}: r_mean {rows[-1][1]:.2f} ({seconds:.0f} s)", flush=True)

    print(f"\nfine-tuning the demo's model on {args.subset} new toy images, batch {args.batch_size}, {args.epochs} epochs, "
          f"warmup 10%, augment light; val r_mean (500 images)")
    for label, r_mean, seconds in rows:
        print(f"  {label:<45}{r_mean:>8.2f}{seconds:>8.0f} s")


if __name__ == "__main__":
    main()
