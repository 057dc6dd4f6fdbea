"""Is loading or the model the bottleneck? Loader samples/s next to training-step samples/s; converter speed.

    python benchmarks/bench_data.py [--images 512] [--batch 32] [--workers 2] [--convert-images 20000]

Loaders (each one pass after a warm-up batch, `--workers` processes, the default `augment="light"`):
the JSON caption loader and the WebDataset shard loader, on generated 500x375 JPEGs at 224 px and on the toy
set's 64 px images. Training steps (forward, loss, backward, AdamW) of `tiny/VIT-T-8` at 64 px and
`openai/VIT-B-32` at 224 px at the same batch, on random weights and inputs, in this process. Then the time
`datasets/convert.py` takes for 5 captions x `--convert-images` images (CSV and Karpathy layouts, images present).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_photos(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[dict]:
    """n noisy gradient JPEGs (photo-sized files) with five captions each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    w, h = size
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    for i in range(n):
        pixels = np.clip(base * rng.uniform(0.3, 1, 3) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
        entries.append({"image": f"{folder.name}/{i:06d}.jpg", "caption": [f"photo {i} caption {k}" for k in range(5)]})
    return entries


def loader_rate(loader, n_batches: int, batch: int) -> float:
    iterator = iter(loader)
    next(iterator)  # workers started, first batch decoded
    started = time.perf_counter()
    done = 0
    for _ in iterator:
        done += 1
        if done == n_batches:
            break
    return done * batch / (time.perf_counter() - started)


def loaders(root: Path, entries: list[dict], size: int, batch: int, workers: int, tmp: Path, tag: str) -> dict:
    from torch.utils.data import DataLoader

    from utils.data.augment import CaptionAugment
    from utils.data.sources.pipeline import convert
    from utils.data.sources.stream import ShardStream
    from utils.dataloader import CaptionDataset, EpochSampler
    from utils.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("openai", 77)
    dataset = CaptionDataset(entries, root, CaptionAugment(size, "light"), tokenizer)
    sampler = EpochSampler(dataset, batch)
    n_batches = len(entries) // batch - 1
    json_rate = loader_rate(DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                                       drop_last=True), n_batches, batch)
    lines = tmp / f"{tag}.jsonl"
    lines.write_text("\n".join(json.dumps({**e, "image": str(root / e["image"])}) for e in entries))
    with contextlib.redirect_stdout(io.StringIO()):
        convert(dict(source="jsonl", input=str(lines), output_dir=str(tmp), name=tag, images="", val_ratio=0.0,
                     test_ratio=0.0, seed=0, to="wds", shard_size=max(len(entries) // (4 * workers), 1),
                     image_column="filepath", caption_column="title", separator="", phi="tiny/VIT-T-8",
                     bert_vocab_path="", skip_malformed=False, overwrite=True))
    stream = ShardStream(str(tmp / f"{tag}_train"), CaptionAugment(size, "light"), tokenizer, batch, seed=0,
                         workers=workers)
    shard_rate = loader_rate(DataLoader(stream, batch_size=None, num_workers=workers),
                             min(n_batches, stream.batches_per_epoch() - 1), batch)
    return {"json": json_rate, "shards": shard_rate}


def step_rate(phi: str, batch: int, steps: int = 3) -> float:
    import torch

    from nets import build_model, get_config
    from utils.train.distributed import DistInfo
    from utils.train.loss import ClipLoss
    from utils.train.optim import build_optimizer

    torch.manual_seed(0)
    config = get_config(phi)
    model = build_model(config).train()
    optimizer = build_optimizer(model, "adamw", 1e-4, 0.9, 0.1)
    criterion = ClipLoss(DistInfo())
    pixels = torch.randn(batch, 3, config.vision.image_size, config.vision.image_size)
    tokens = torch.randint(1, config.text.vocab_size - 2, (batch, 20))
    tokens = torch.cat([torch.full((batch, 1), config.text.vocab_size - 2), tokens,
                        torch.full((batch, 1), config.text.vocab_size - 1),
                        torch.zeros(batch, config.text.context_length - 22, dtype=torch.long)], 1)
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        loss = criterion(*model(pixels, tokens))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return batch / float(np.median(times[1:]))


def convert_speed(tmp: Path, n_images: int) -> dict:
    from PIL import Image

    from utils.data.sources.pipeline import convert

    folder = tmp / "many"
    folder.mkdir()
    buffer = io.BytesIO()
    for i in range(n_images):  # distinct 16x16 JPEGs, so the duplicate check has size collisions to hash
        buffer.seek(0)
        buffer.truncate()
        Image.new("RGB", (16, 16), (i % 256, (i // 256) % 256, (i // 65536) % 256)).save(buffer, "JPEG")
        (folder / f"{i:06d}.jpg").write_bytes(buffer.getvalue())
    with (tmp / "many.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        writer.writerows([f"many/{i:06d}.jpg", f"a picture number {i}, caption {k}"]
                         for i in range(n_images) for k in range(5))
    karpathy = {"images": [{"filename": f"{i:06d}.jpg", "filepath": "many", "split": ("train", "val", "test")[i % 3],
                            "sentences": [{"raw": f"a picture number {i}, caption {k}"} for k in range(5)]}
                           for i in range(n_images)]}
    (tmp / "karpathy.json").write_text(json.dumps(karpathy))
    common = dict(images="", val_ratio=0.01, test_ratio=0.0, seed=0, to="json", shard_size=1000,
                  image_column="filepath", caption_column="title", separator="", phi="openai/VIT-B-32",
                  bert_vocab_path="", skip_malformed=False, overwrite=True)
    seconds = {}
    for source, path in (("csv", tmp / "many.csv"), ("karpathy", tmp / "karpathy.json")):
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            convert({**common, "source": source, "input": str(path), "output_dir": str(tmp / f"out_{source}"),
                     "name": source})
        seconds[source] = time.perf_counter() - started
    return seconds


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--convert-images", type=int, default=20000)
    args = parser.parse_args()

    from utils.data.toy import make_toy_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = make_photos(tmp / "photos", args.images, (500, 375))
        toy = ROOT / "datasets" / "toy"
        make_toy_dataset(toy)
        toy_entries = json.loads((toy / "en_train.json").read_text())[:args.images]
        rows = [("500x375 JPEG at 224 px", loaders(tmp, photos, 224, args.batch, args.workers, tmp, "photos"),
                 "openai/VIT-B-32"),
                ("toy 64 px", loaders(toy, toy_entries, 64, args.batch, args.workers, tmp, "toy"), "tiny/VIT-T-8")]
        print(f"batch {args.batch}, {args.workers} loader workers, {torch.get_num_threads()} threads for the model")
        print(f"{'images':<24}{'JSON loader':>14}{'shard loader':>14}{'train step':>14}  model")
        for label, rates, phi in rows:
            step = step_rate(phi, args.batch)
            print(f"{label:<24}{rates['json']:>10.0f} /s{rates['shards']:>10.0f} /s{step:>10.1f} /s  {phi}")
        if args.convert_images:
            seconds = convert_speed(tmp, args.convert_images)
            for source, s in seconds.items():
                print(f"convert.py --source {source}: {args.convert_images * 5} caption lines, {args.convert_images} "
                      f"images present, {s:.1f} s")


if __name__ == "__main__":
    main()
