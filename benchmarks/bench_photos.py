"""Phone photos (12 MP JPEGs) from files to features: full vs reduced-scale decoding, next to the model alone.

    python benchmarks/bench_photos.py [--photos DIR] [--count 16] [--phis tiny/VIT-T-8 openai/VIT-B-32]
                                      [--parts decode predict loader resize]

Generates --count 4032x3024 JPEGs at quality 92 (smooth colour fields, shapes and sensor-like noise, about
3.6 MB each, like a phone's) unless --photos names a folder, then reports:
- decode: per-core images/s of open + OpenAI preprocessing, full decode vs reduced scale, the pixels decoded,
  and how much the 224 px input and the features (random weights) change;
- predict: images/s from files to features for folder prediction (dir_predict) and search indexing: today's
  loop (each batch decoded in full, one image after another, then encoded) against fast_decode with the
  next batch decoded in threads, next to the model-only rate of predict.py --mode fps;
- loader: training loader samples/s (augment "light", 2 workers) on the photos as they are, with and without
  fast_decode, and on the copies datasets/convert.py --resize 256 writes;
- resize: convert.py --resize 256 throughput.
Wall-clock rates swing with the machine's load (printed); CPU ms per image is steadier.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


WEIGHTS: dict[str, str] = {}  # phi -> weight file (--weights), else random weights


def make_photos(folder: Path, count: int, size: tuple[int, int] = (4032, 3024)) -> list[Path]:
    """`count` photo-like JPEGs (quality 92) in `folder`, made once, one per core at a time (0.7 s each)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo_{i:03d}.jpg" for i in range(count)]
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        list(pool.map(lambda i: _make_photo(paths[i], i, size), [i for i, p in enumerate(paths) if not p.exists()]))
    return paths


def _make_photo(path: Path, seed: int, size: tuple[int, int]) -> None:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    picture = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    draw = ImageDraw.Draw(picture)
    for _ in range(12):
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(h // 20, h // 4))
        shape = draw.ellipse if rng.integers(2) else draw.rectangle
        shape((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    noisy = np.asarray(picture, dtype=np.int16) + rng.normal(0, 6, (h, w, 1)).astype(np.int16)
    # Written aside and renamed, so a photo cut off half-way is made again next time rather than read.
    partial = path.with_suffix(".part")
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(partial, format="JPEG", quality=92)
    partial.replace(path)


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Timer:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *_):
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def rate(n: int, timer: Timer) -> str:
    return f"{n / timer.wall:7.2f} images/s  {1000 * timer.cpu / n:7.1f} CPU ms/image"


def part_decode(paths: list[Path], phis: list[str]) -> None:
    import torch

    from clip import CLIP
    from utils.data.images import eval_sides, eval_transform, open_image

    torch.set_num_threads(1)
    transform = eval_transform(224)
    inputs = {}
    for label, sides in (("full decode", None), ("reduced scale", eval_sides(224))):
        with Timer() as timer:
            images = [open_image(p, sides) for p in paths]
            inputs[label] = torch.stack([transform(image) for image in images])
        pixels = np.mean([image.width * image.height for image in images]) / 1e6
        print(f"  {label:<14} {rate(len(paths), timer)}  (one thread)  {pixels:6.2f} MP decoded per image")
    full, reduced = inputs["full decode"], inputs["reduced scale"]
    print(f"  224 px input, reduced vs full: mean |diff| {(full - reduced).abs().mean():.4f}, "
          f"max {(full - reduced).abs().max():.3f} (normalised units; 1 grey level = {1 / 255 / 0.27:.4f})")
    torch.set_num_threads(os.cpu_count() or 1)
    for phi in phis:
        torch.manual_seed(0)
        weights = WEIGHTS.get(phi, "")
        model = CLIP(model_path=weights, phi="auto" if weights else phi)
        full = torch.stack([model.transform(open_image(p, None)) for p in paths])
        reduced = torch.stack([model.transform(model.open_image(p)) for p in paths])
        with torch.no_grad():
            a, b = (torch.nn.functional.normalize(model.net.encode_image(x), dim=-1) for x in (full, reduced))
        cosine = (a * b).sum(-1)
        print(f"  {phi} features ({weights or 'random weights'}), reduced vs full: cosine mean {cosine.mean():.5f}, "
              f"min {cosine.min():.5f}")


def today_loop(model, paths: list[Path], batch_size: int) -> int:
    """What dir_predict and search indexing did before: each batch decoded in full, one image after another."""
    import torch

    from utils.data.images import open_rgb

    done = 0
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            pixels = torch.stack([model.transform(open_rgb(p)) for p in paths[start:start + batch_size]])
            done += len(model.net.encode_image(pixels))
    return done


def part_predict(paths: list[Path], phis: list[str], work: Path, batch_size: int) -> dict:
    import torch

    from clip import CLIP
    from utils.data.pictures import ImagePipeline
    from utils.predict.folder import predict_folder
    from utils.predict.search import encode_paths
    from utils.predict.speed import encoding_speed

    results = {}
    folder = paths[0].parent
    for phi in phis:
        torch.manual_seed(0)
        rows = {}
        model = CLIP(model_path="", phi=phi, fast_decode=False)
        model_only = encoding_speed(model, (batch_size,), repeats=3)["images"][batch_size]
        pixels = torch.randn(batch_size, 3, model.net.config.vision.image_size, model.net.config.vision.image_size)
        with Timer() as timer, torch.no_grad():
            for _ in range(3):
                model.net.encode_image(pixels)
        print(f"  {phi}: model only (predict.py --mode fps, batch {batch_size}): {model_only:.2f} images/s, "
              f"{1000 * timer.cpu / (3 * batch_size):.1f} CPU ms/image")
        with Timer() as timer:
            today_loop(model, paths, batch_size)
        rows["today"] = len(paths) / timer.wall
        print(f"    today's loop, full decode     {rate(len(paths), timer)}")
        for fast in (False, True):
            # What CLIP(fast_decode=fast) builds, without loading the model again.
            model.pipeline = ImagePipeline(model.net.encode_image, model.transform, model.device, fast_decode=fast)
            names = ["a photo of a dog", "a photo of a cat"]
            targets = torch.nn.functional.normalize(model.detect_image_for_eval(texts=names)[1].float(), dim=-1)
            with Timer() as timer:
                predict_folder(model, names, targets, folder, work / "predictions.csv", 2, batch_size)
            label = "fast_decode" if fast else "full decode"
            rows[f"dir_predict {label}"] = len(paths) / timer.wall
            print(f"    dir_predict, {label:<15} {rate(len(paths), timer)}  "
                  f"{len(paths) / timer.wall / rows['today']:.2f}x today, {len(paths) / timer.wall / model_only:.0%} "
                  "of model only")
            with Timer() as timer:
                encode_paths(model, batch_size)(paths)
            rows[f"search {label}"] = len(paths) / timer.wall
            print(f"    search index, {label:<14} {rate(len(paths), timer)}  "
                  f"{len(paths) / timer.wall / rows['today']:.2f}x today, {len(paths) / timer.wall / model_only:.0%} "
                  "of model only")
        rows["model only"] = model_only
        results[phi] = rows
    return results


def part_loader(paths: list[Path], work: Path, resized_json: Path | None) -> None:
    import torch
    from torch.utils.data import DataLoader

    from utils.data.augment import CaptionAugment
    from utils.dataloader import CaptionDataset, EpochSampler
    from utils.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("openai", 77)
    augment = CaptionAugment(224, "light")
    entries = [{"image": p.name, "caption": ["a photo"]} for p in paths]
    cases = [("as they are, full decode", entries, paths[0].parent, False),
             ("as they are, fast_decode", entries, paths[0].parent, True)]
    if resized_json is not None:
        cases.append(("after --resize 256", json.loads(resized_json.read_text()), resized_json.parent, True))
    for label, rows, root, fast in cases:
        dataset = CaptionDataset(rows, root, augment, tokenizer, fast_decode=fast)
        loader = DataLoader(dataset, batch_size=8, num_workers=2, sampler=EpochSampler(dataset, 8, shuffle=False))
        with Timer() as timer:
            n = sum(len(pixels) for pixels, _ in loader)
        print(f"  {label:<26} {n / timer.wall:7.2f} samples/s  {1000 * timer.cpu / n:7.1f} CPU ms/sample  (2 workers)")
    torch.set_num_threads(os.cpu_count() or 1)


def part_resize(paths: list[Path], work: Path) -> Path:
    from utils.data.sources.pipeline import convert

    for path in paths:
        path.with_suffix(".txt").write_text("a photo")
    out = work / "resized"
    cfg = dict(source="folder", input=str(paths[0].parent), images="", output_dir=str(out), name="photos",
               val_ratio=0.0, test_ratio=0.0, seed=0, to="json", shard_size=1000, image_column="filepath",
               caption_column="title", separator="", phi="tiny/VIT-T-8", skip_malformed=False, overwrite=True,
               bert_vocab_path=str(ROOT / "model_data/bert-base-chinese-vocab.txt"), resize=256, jpeg_quality=90,
               num_workers=None)
    for copy in (out / "photos_256px").glob("*.jpg"):
        copy.unlink()  # time the writing, not the resume
    with Timer() as timer:
        convert(cfg)
    print(f"  convert.py --resize 256: {rate(len(paths), timer)}  ({os.cpu_count()} processes)")
    return out / "photos_train.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", default="", help="a folder of JPEGs to use instead of generated ones")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--phis", nargs="+", default=["tiny/VIT-T-8", "openai/VIT-B-32"])
    parser.add_argument("--parts", nargs="+", default=["decode", "predict", "resize", "loader"])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--workdir", default="/tmp/clip_bench_photos")
    parser.add_argument("--weights", nargs="*", default=[], metavar="PHI=FILE",
                        help="trained weights for a phi's feature comparison (e.g. the demo's for tiny/VIT-T-8)")
    args = parser.parse_args()
    WEIGHTS.update(item.split("=", 1) for item in args.weights)
    work = Path(args.workdir)
    if args.photos:
        from utils.data.images import image_files

        paths = image_files(Path(args.photos))[:args.count]
    else:
        paths = make_photos(work / "photos", args.count)
    print(f"{len(paths)} photos, {np.mean([p.stat().st_size for p in paths]) / 1e6:.1f} MB each; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    resized = None
    for part in args.parts:
        print(f"\n{part}")
        if part == "decode":
            part_decode(paths, args.phis)
        elif part == "predict":
            part_predict(paths, args.phis, work, args.batch_size)
        elif part == "resize":
            resized = part_resize(paths, work)
        elif part == "loader":
            part_loader(paths, work, resized)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
