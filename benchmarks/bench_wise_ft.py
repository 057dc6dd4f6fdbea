"""WiSE-FT on the CPU: what blending the weights before and after fine-tuning keeps (README, "WiSE-FT").

    python benchmarks/bench_wise_ft.py [--pretrained logs/demo_en/last_epoch_weights.pth] [--lr 3e-4] [--epochs 10]

1. "Pretrains" tiny/VIT-T-8 from scratch on the toy set's English captions with the demo's recipe
   (`train.py --demo en`; skipped when --pretrained is given).
2. Fine-tunes it on a different set generated here: other shapes (hexagon, diamond, ring, arrow, bar), other
   colour and background words, a 2x2 layout and other caption templates, so learning it moves the weights
   away from what the toy set needed.
3. Runs `eval.py --eval_type wise_ft` with the toy val split as the control set and prints, per alpha, the toy
   r_mean (what the start knew) and the new set's r_mean (what fine-tuning taught).

The defaults fine-tune 10 epochs on 3000 new images at Init_lr 3e-4, long enough to learn the new set (r_mean
about 62) and to forget most of the toy set. About 3.5 minutes on 16 CPU cores; 2 cores take several times that.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_recipes import run as train  # noqa: E402  (benchmarks/, this script's folder: one train.py run)

# No word here is one of the toy set's colours, shapes or backgrounds.
COLOURS = {"teal": (0, 128, 128), "brown": (120, 70, 30), "magenta": (220, 0, 160), "olive": (128, 128, 0),
           "navy": (20, 30, 110), "lime": (150, 230, 50)}
BACKGROUNDS = {"charcoal": (60, 60, 60), "sand": (200, 180, 120), "mint": (180, 230, 200), "lavender": (200, 190, 240)}
SHAPES = {
    "hexagon": [(math.cos(a), math.sin(a)) for a in np.arange(6) * math.pi / 3],
    "diamond": [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)],
    "arrow": [(-1, -0.25), (0.2, -0.25), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.25), (-1, 0.25)],
    "bar": [(-1, -0.3), (1, -0.3), (1, 0.3), (-1, 0.3)],
    "ring": [],  # drawn as two circles
}
PLACES = ("upper left", "upper right", "lower left", "lower right")
SUPERSAMPLE = 4


def _render(objects: list[tuple[str, str, int, float]], background: str, rng: np.random.Generator,
            size: int) -> Image.Image:
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[background])
    draw = ImageDraw.Draw(canvas)
    for colour, shape, cell, radius in objects:
        row, column = divmod(cell, 2)
        cx, cy = ((np.array([column, row]) + 0.5) * size / 2 + rng.uniform(-2, 2, 2)) * SUPERSAMPLE
        r = radius * SUPERSAMPLE
        if shape == "ring":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
            draw.ellipse((cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2), fill=BACKGROUNDS[background])
        else:
            draw.polygon([(cx + r * x, cy + r * y) for x, y in SHAPES[shape]], fill=COLOURS[colour])
    pixels = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=float) + rng.normal(0, 3, (size, size, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _captions(objects: list[tuple[str, str, int, float]], background: str, rng: np.random.Generator) -> list[str]:
    templates = [
        lambda objs: " with ".join(f"{c} {s}" for c, s, _, _ in objs),
        lambda objs: "; ".join(f"{s} coloured {c}" for c, s, _, _ in objs),
        lambda objs: " / ".join(f"{s} ({c}, {PLACES[cell]})" for c, s, cell, _ in objs),
        lambda objs: f"{len(objs)} item{'s' if len(objs) > 1 else ''} over {background}: "
        + ", ".join(f"{c} {s}" for c, s, _, _ in objs),
        lambda objs: "shapes: " + " plus ".join(f"{s} in {c}" for c, s, _, _ in objs),
        lambda objs: f"{background} backdrop, " + " beside ".join(f"{c} {s}" for c, s, _, _ in objs),
    ]
    captions = []
    for index in rng.choice(len(templates), size=5, replace=False):
        captions.append(templates[index]([objects[i] for i in rng.permutation(len(objects))]))
    return captions


def make_new_set(root: Path, n_train: int, n_val: int, seed: int = 0, size: int = 64) -> dict[str, Path]:
    """A second captioned-shapes distribution: {"train": json, "val": json} under `root`."""
    files = {}
    for split_index, (split, count) in enumerate((("train", n_train), ("val", n_val))):
        (root / split).mkdir(parents=True, exist_ok=True)
        entries = []
        for index in range(count):
            rng = np.random.default_rng([seed, 7, split_index, index])
            count_objects = int(rng.integers(1, 4))
            kinds = set()
            while len(kinds) < count_objects:
                kinds.add((str(rng.choice(list(COLOURS))), str(rng.choice(list(SHAPES)))))
            cells = rng.choice(4, size=count_objects, replace=False)
            objects = [(c, s, int(cell), float(rng.uniform(0.16, 0.22) * size))
                       for (c, s), cell in zip(sorted(kinds), cells)]
            background = str(rng.choice(list(BACKGROUNDS)))
            path = f"{split}/{index:06d}.jpg"
            _render(objects, background, rng, size).save(root / path, quality=95)
            entries.append({"image": path, "caption": _captions(objects, background, rng)})
        files[split] = root / f"{split}.json"
        files[split].write_text(json.dumps(entries, indent=1), encoding="utf-8")
    return files


def sweep(settings: dict) -> tuple[dict, float]:
    """(results, seconds) of eval.py --eval_type wise_ft under `settings`."""
    import importlib

    from utils.config import config_block
    from utils.eval.run import run_eval

    eval_script = importlib.import_module("eval")
    started = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        results = run_eval({**config_block(vars(eval_script)), "eval_type": "wise_ft", **settings})
    return results, time.time() - started


def main() -> None:
    import os

    import torch

    from utils.data.toy import make_toy_dataset
    from utils.train.demo import DEMO_PRESETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default="", help="weights of `train.py --demo en` (trained here if empty)")
    parser.add_argument("--n_train", type=int, default=3000, help="images of the new set to fine-tune on")
    parser.add_argument("--n_val", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    demo = DEMO_PRESETS["en"]
    make_toy_dataset(demo["datasets_path"])
    started = time.time()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pretrained = args.pretrained
        if not pretrained:
            summary, seconds = train({**demo, "save_dir": str(tmp / "pretrain")})
            pretrained = str(tmp / "pretrain" / "last_epoch_weights.pth")
            print(f"1. pretrained on the toy set (demo recipe): toy r_mean {summary['metrics']['r_mean']:.2f} "
                  f"({seconds:.0f} s)", flush=True)
        made = time.time()
        files = make_new_set(tmp / "new", args.n_train, args.n_val)
        print(f"   new set: {args.n_train} train + {args.n_val} val images ({time.time() - made:.0f} s)", flush=True)
        summary, seconds = train({**demo, "model_path": pretrained, "datasets_path": str(tmp / "new"),
                                  "datasets_train_json_path": str(files["train"]),
                                  "datasets_val_json_path": str(files["val"]), "Epoch": args.epochs,
                                  "Init_lr": args.lr, "Min_lr": args.lr / 100, "warmup_ratio": 0.1, "batch_size": args.batch_size,
                                  "save_dir": str(tmp / "finetune")})
        print(f"2. fine-tuned on the new set, {args.epochs} epochs at Init_lr {args.lr:g}: new-set r_mean "
              f"{summary['metrics']['r_mean']:.2f} ({seconds:.0f} s)", flush=True)
        results, seconds = sweep({"wise_ft_start_path": pretrained, "phi": demo["phi"],
                                  "model_path": str(tmp / "finetune" / "last_epoch_weights.pth"),
                                  "datasets_path": str(tmp / "new"), "datasets_val_json_path": str(files["val"]),
                                  "control_type": "retrieval", "control_datasets_path": demo["datasets_path"],
                                  "control_json_path": demo["datasets_val_json_path"], "wise_ft_alphas": args.alphas,
                                  "wise_ft_save_dir": str(tmp / "wise_ft"), "num_workers": 1, "precision": "fp32"})
        print(f"3. eval.py --eval_type wise_ft ({seconds:.0f} s)\n")

    print(f"{'alpha':>6}{'toy r_mean (control)':>24}{'new-set r_mean (fine-tune val)':>33}{'mean':>8}")
    for row in results["rows"]:
        print(f"{row['alpha']:>6.2f}{row['control_score']:>24.2f}{row['val_score']:>33.2f}{row['selection']:>8.2f}")
    print(f"chosen alpha {results['chosen_alpha']:g} ({results['rule']}); {time.time() - started:.0f} s in all")


if __name__ == "__main__":
    main()
