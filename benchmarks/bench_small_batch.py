"""The small-batch question: CLIP's softmax loss vs SigLIP's sigmoid loss at batch 16, 32 and 64, from scratch.

    python benchmarks/bench_small_batch.py [--epochs 8] [--seeds 11] [--batches 16 32 64] [--jobs 2] [--quick]

scikit-learn's digits (1797 real handwritten 8x8 digits, 0-9) are upscaled to the tiny model's 64 px and split
80/20, stratified by digit, into training and held-out images. Every image gets five captions from eight
templates ("a photo of the digit seven", "a handwritten 7", ...). Each cell trains `tiny/VIT-T-8` from scratch
through `python train.py` (one torch thread per run, `--jobs` runs at a time) with `--loss softmax` or
`--loss sigmoid`, the same epochs, seed and learning rate at every batch size, then scores the held-out images:

- zero-shot accuracy over the 10 digits, each class the mean of its eight prompts' text features;
- recall@1/5 by digit: image -> text, an image counts when one of its K nearest held-out captions names its
  digit; text -> image, a caption counts when one of its K nearest held-out images shows its digit (captions of
  one digit are interchangeable here, so instance-level recall would only measure ties).

`--quick` checks the wiring in a minute or two (300 training images, 1 epoch, one seed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {w}: the digit's word, {d}: its numeral.
TEMPLATES = ("a photo of the digit {w}", "a handwritten {w}", "the number {w}, written by hand",
             "a scan of a handwritten digit {w}", "the digit {d}", "{w}", "a picture of the number {w}",
             "a handwritten {d}")
CAPTIONS_PER_IMAGE = 5
# The CPU demo's from-scratch recipe (utils/train/demo.py), one rate at every batch size.
RECIPE = dict(model_path="", phi="tiny/VIT-T-8", Init_lr=1e-3, Min_lr=1e-5, scale_lr="false", warmup_ratio=0.05,
              weight_decay=0.1, eval_flag="false", save_period=1000, num_workers=0, precision="fp32", Cuda="false",
              keep_states=1)


def caption(template: str, digit: int) -> str:
    return template.format(w=WORDS[digit], d=digit)


def write_digits(root: Path, n_train: int | None = None, seed: int = 0) -> tuple[Path, Path, list[int]]:
    """The digits as 64 px PNGs under root with train/val caption JSONs; returns their paths and the val labels."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(indices, test_size=0.2, stratify=digits.target, random_state=seed)
    if n_train is not None:
        train_idx = train_idx[:n_train]
    rng = np.random.default_rng(seed)
    splits = {}
    for split, chosen in (("train", train_idx), ("val", val_idx)):
        (root / split).mkdir(parents=True, exist_ok=True)
        entries = []
        for i in chosen:
            # Dark ink on white, as on paper; bicubic, so strokes stay smooth at 8x.
            ink = (255 - digits.images[i] * 255 / 16).clip(0, 255).astype(np.uint8)
            path = f"{split}/{int(i):04d}.png"
            Image.fromarray(ink).resize((64, 64), Image.Resampling.BICUBIC).convert("RGB").save(root / path)
            digit = int(digits.target[i])
            chosen_templates = rng.choice(len(TEMPLATES), size=CAPTIONS_PER_IMAGE, replace=False)
            entries.append({"image": path, "caption": [caption(TEMPLATES[t], digit) for t in chosen_templates],
                            "label": digit})
        splits[split] = root / f"{split}.json"
        splits[split].write_text(json.dumps(entries))
    labels = [int(digits.target[i]) for i in val_idx]
    return splits["train"], splits["val"], labels


def train_cell(data: Path, save_dir: Path, loss: str, batch: int, epochs: int, seed: int) -> float:
    """Seconds of one `python train.py` run, on one thread."""
    args = dict(RECIPE, datasets_path=data, datasets_train_json_path=data / "train.json",
                datasets_val_json_path=data / "val.json", loss=loss, batch_size=batch, Epoch=epochs, seed=seed,
                save_dir=save_dir)
    command = [sys.executable, str(ROOT / "train.py"), *[x for k, v in args.items() for x in (f"--{k}", str(v))]]
    started = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        raise SystemExit(f"train.py failed ({loss}, batch {batch}, seed {seed}):\n{result.stderr[-3000:]}")
    return time.time() - started


def class_recall(scores, query_labels, candidate_labels, ks=(1, 5)) -> dict[int, float]:
    """Share of queries (rows of scores) with a candidate of their own label among their k best, for each k."""
    top = scores.topk(max(ks), dim=1).indices
    hits = candidate_labels[top] == query_labels[:, None]  # queries x max(ks)
    return {k: hits[:, :k].any(dim=1).float().mean().item() * 100 for k in ks}


def evaluate(weights: Path, data: Path, labels: list[int]) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from clip import CLIP

    model = CLIP(model_path=str(weights), phi="tiny/VIT-T-8", cuda=False, precision="fp32", onednn=False)
    entries = json.loads((data / "val.json").read_text())
    with torch.inference_mode():
        pixels = model.preprocess([model.open_image(data / e["image"]) for e in entries])
        images = F.normalize(model.net.encode_image(pixels).float(), dim=-1)
        captions = [c for e in entries for c in e["caption"]]
        texts = F.normalize(model.net.encode_text(model.tokenize(captions)).float(), dim=-1)
        prompts = model.net.encode_text(model.tokenize([caption(t, d) for d in range(10) for t in TEMPLATES]))
        classes = F.normalize(F.normalize(prompts.float(), dim=-1).view(10, len(TEMPLATES), -1).mean(1), dim=-1)
    image_labels = torch.tensor(labels)
    caption_labels = image_labels.repeat_interleave(CAPTIONS_PER_IMAGE)
    # Scale and bias are the same for every pair, so cosines rank as the softmax or the sigmoid scores would.
    accuracy = ((images @ classes.t()).argmax(1) == image_labels).float().mean().item() * 100
    i2t = class_recall(images @ texts.t(), image_labels, caption_labels)
    t2i = class_recall(texts @ images.t(), caption_labels, image_labels)
    return {"zero-shot": accuracy, "i2t@1": i2t[1], "i2t@5": i2t[5], "t2i@1": t2i[1], "t2i@5": t2i[5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[11])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--losses", nargs="+", default=["softmax", "sigmoid"], choices=["softmax", "sigmoid"])
    parser.add_argument("--jobs", type=int, default=2, help="train.py runs at a time, one thread each")
    parser.add_argument("--quick", action="store_true", help="300 training images, 1 epoch, one seed")
    parser.add_argument("--keep", type=Path, help="write data and runs here instead of a temporary folder")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.seeds = 1, args.seeds[:1]
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        data = root / "digits"
        _, _, labels = write_digits(data, n_train=300 if args.quick else None)
        n_train = len(json.loads((data / "train.json").read_text()))
        cells = [(loss, batch, seed) for seed in args.seeds for batch in args.batches for loss in args.losses]
        started = time.time()

        def run(cell):
            loss, batch, seed = cell
            save_dir = root / f"{loss}_b{batch}_s{seed}"
            seconds = train_cell(data, save_dir, loss, batch, args.epochs, seed)
            print(f"trained {loss:<8} batch {batch:<3} seed {seed:<3} in {seconds:.0f} s", flush=True)
            return save_dir

        with ThreadPoolExecutor(args.jobs) as pool:
            save_dirs = list(pool.map(run, cells))
        results = {cell: evaluate(save_dir / "last_epoch_weights.pth", data, labels)
                   for cell, save_dir in zip(cells, save_dirs)}
        elapsed = time.time() - started

    print(f"\ndigits: {n_train} training, {len(labels)} held-out images; tiny/VIT-T-8 from scratch, {args.epochs} "
          f"epochs, Init_lr 1e-3 (no batch scaling), seeds {' '.join(map(str, args.seeds))}; {elapsed:.0f} s")
    metrics = list(next(iter(results.values())))
    print(f"{'loss':<9}{'batch':>6}" + "".join(f"{m:>11}" for m in metrics))
    for loss in args.losses:
        for batch in args.batches:
            runs = [results[(loss, batch, seed)] for seed in args.seeds]
            means = {m: statistics.mean(r[m] for r in runs) for m in metrics}
            spread = {m: (max(r[m] for r in runs) - min(r[m] for r in runs)) / 2 for m in metrics}
            cells_text = "".join(f"{means[m]:>6.1f} ±{spread[m]:<3.1f}" if len(runs) > 1 else f"{means[m]:>11.1f}"
                                 for m in metrics)
            print(f"{loss:<9}{batch:>6}{cells_text}")
    if len(args.seeds) > 1:
        print("(mean ± half the range over the seeds)")
    print(json.dumps({f"{loss}/{batch}/{seed}": r for (loss, batch, seed), r in results.items()}))


if __name__ == "__main__":
    main()
