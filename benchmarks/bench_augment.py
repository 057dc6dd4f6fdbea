"""Retrieval after training with each augmentation level, side by side, on the toy set.

    python benchmarks/bench_augment.py [--levels none light strong former] [--seeds 11 2] [--epochs 10] [--lang en]

Trains the tiny model from scratch with the CPU demo's recipe (`train.py --demo en`), the same number of
steps for every level, once per seed, and prints val r_mean per level and seed with the mean. `former` is
the pipeline `datasets_random=True` ran before `augment` existed (random resized crop of 50-100%, horizontal
flip, ImageNet AutoAugment): the toy captions name colours and sides, which it falsifies.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def former_default(size: int):
    from torchvision.transforms import InterpolationMode, v2

    from utils.data.images import to_tensor

    pipeline = v2.Compose([v2.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC),
                           v2.RandomHorizontalFlip(), v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET), *to_tensor()])
    return lambda image, caption: (pipeline(image), caption)


def train_once(level: str, seed: int, epochs: int, lang: str, save_root: Path) -> tuple[float, float]:
    """(val r_mean, seconds) of one from-scratch run."""
    import train
    import utils.train.run as training
    from utils.data.toy import make_toy_dataset
    from utils.config import config_block
    from utils.data.augment import CaptionAugment
    from utils.train.demo import demo_config

    settings = dict(seed=seed, Epoch=epochs, augment="light" if level == "former" else level,
                    datasets_random=level != "none", save_dir=str(save_root / f"{level}_{seed}"))
    cfg = demo_config({**config_block(vars(train)), "demo": lang}, settings)
    make_toy_dataset(cfg["datasets_path"])
    original = training.CaptionAugment
    if level == "former":
        training.CaptionAugment = lambda size, name, letterbox=False: (
            former_default(size) if name != "none" else CaptionAugment(size, name, letterbox))
    started = time.time()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            summary = training.run_training(cfg)
    finally:
        training.CaptionAugment = original
    return summary["metrics"]["r_mean"], time.time() - started


def main() -> None:
    import os
    import tempfile

    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", nargs="+", default=["none", "light", "strong", "former"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[11, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lang", default="en", choices=["en", "cn"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)

    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for level in args.levels:
            for seed in args.seeds:
                r_mean, seconds = train_once(level, seed, args.epochs, args.lang, Path(tmp))
                results.setdefault(level, []).append(r_mean)
                print(f"{level:<8} seed {seed:<4} r_mean {r_mean:6.2f}  ({seconds:.0f} s)", flush=True)

    print(f"\ntoy {args.lang}, tiny model from scratch, {args.epochs} epochs, demo recipe; val r_mean")
    header = f"{'augment':<10}" + "".join(f"{'seed ' + str(s):>10}" for s in args.seeds) + f"{'mean':>10}"
    print(header)
    for level, values in results.items():
        print(f"{level:<10}" + "".join(f"{v:>10.2f}" for v in values) + f"{statistics.mean(values):>10.2f}")
    if "none" in results and "light" in results:
        gap = statistics.mean(results["light"]) - statistics.mean(results["none"])
        print(f"light - none: {gap:+.2f} r_mean")


if __name__ == "__main__":
    main()
