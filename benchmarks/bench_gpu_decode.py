"""GPU JPEG decoding (nvJPEG through torchvision.io.decode_jpeg, in batches) against the CPU's reduced-scale
decode, for 12-MP photos from files to features on a CUDA machine.

    python benchmarks/bench_gpu_decode.py [--count 64] [--batch 32] [--phi openai/VIT-B-32] [--threads 0]

Rows: images/s of (1) the CPU path the project uses (utils/data/images.open_image at the model's scale + the
eval transform, in --threads threads, 0 = one per core), (2) decode_jpeg on the GPU in batches + bicubic
antialiased resize + centre crop + normalise on the GPU, each alone and each feeding the model (fp16) with
the next batch prepared while the model encodes; and how far (2)'s inputs and features are from (1)'s.
The CPU path stays the default unless (2) wins by a clear margin on the machines that matter.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--phi", default="openai/VIT-B-32")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/clip_bench_photos")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the same code (fp32), to check it")
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    from benchmarks.bench_photos import make_photos
    from clip import CLIP
    from utils.data.images import decode_ahead
    from utils.data.preprocess import OPENAI_MEAN, OPENAI_STD

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("needs a CUDA device (or --device cpu for a dry run)")
    device = torch.device(args.device)
    half = torch.float16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    paths = make_photos(Path(args.workdir) / "photos", args.count)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.manual_seed(0)
    model = CLIP(model_path="", phi=args.phi, cuda=device.type == "cuda", precision="fp16" if device.type == "cuda" else "fp32")
    size = model.net.config.vision.image_size
    mean = torch.tensor(OPENAI_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=device).view(1, 3, 1, 1)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    print(f"{len(paths)} photos, {name}, {threads} CPU threads, {args.phi} {model.precision}")

    def cpu_batches():
        for batch in decode_ahead(paths, lambda p: model.transform(model.open_image(p)), args.batch, threads):
            yield torch.stack(batch).to(device, non_blocking=True)

    def read(batch_paths):
        return [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in batch_paths]

    def gpu_prepare(data):
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)  # list of (3, H, W) uint8
        out = []
        for image in images:  # photos differ in size: resize one by one, then batch
            h, w = image.shape[-2:]
            scale = size / min(h, w)
            new = (max(size, int(h * scale)), max(size, int(w * scale)))
            resized = F.interpolate(image[None].float(), size=new, mode="bicubic", antialias=True, align_corners=False)
            top, left = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
            out.append(resized[..., top:top + size, left:left + size].clamp_(0, 255).round_())
        return (torch.cat(out) / 255 - mean) / std

    def gpu_batches():
        with ThreadPoolExecutor(1) as pool:  # reading files overlaps the GPU's decoding
            chunks = [paths[i:i + args.batch] for i in range(0, len(paths), args.batch)]
            for data in pool.map(read, chunks):
                yield gpu_prepare(data)

    def timed(batches, encode: bool) -> tuple[float, list]:
        sync()
        start = time.perf_counter()
        kept = []
        with torch.no_grad():
            for pixels in batches:
                kept.append(model.net.encode_image(pixels.to(half)).float() if encode else pixels[:2].float())
        sync()
        return len(paths) / (time.perf_counter() - start), kept

    for _ in range(2):  # the first pass warms nvJPEG, cuDNN and the page cache
        timed(gpu_batches(), True)
        timed(cpu_batches(), True)
    for label, batches in (("CPU reduced-scale decode", cpu_batches), ("GPU decode_jpeg", gpu_batches)):
        alone, _ = timed(batches(), False)
        fed, _ = timed(batches(), True)
        print(f"  {label:<26} preprocessing alone {alone:8.1f} images/s   feeding the model {fed:8.1f} images/s")
    with torch.no_grad():
        pixels = torch.randn(args.batch, 3, size, size, device=device, dtype=half)
        model.net.encode_image(pixels)
        sync()
        start = time.perf_counter()
        for _ in range(10):
            model.net.encode_image(pixels)
        sync()
    print(f"  model only (batch {args.batch}, {model.precision})          {10 * args.batch / (time.perf_counter() - start):8.1f} images/s")
    cpu = torch.cat([b.float() for b in cpu_batches()])
    gpu = torch.cat([b.float() for b in gpu_batches()])
    with torch.no_grad():
        a = F.normalize(model.net.encode_image(cpu.to(half)).float(), dim=-1)
        b = F.normalize(model.net.encode_image(gpu.to(half)).float(), dim=-1)
    print(f"  GPU vs CPU input: mean |diff| {(cpu - gpu).abs().mean():.4f}; features (random weights) cosine "
          f"mean {(a * b).sum(-1).mean():.5f}, min {(a * b).sum(-1).min():.5f}")


if __name__ == "__main__":
    main()
