"""CoCa captions on the CPU: the decoder's key-value cache against running the whole prefix at every token.

    python benchmarks/bench_generate.py [--phi coca_ViT-B-32] [--images 1 4] [--reps 3] [--threads N]
                                        [--device cpu|cuda] [--precision fp32|fp16|bf16]

Same seeded random weights everywhere; the end token is banned until the last position (min_seq_len = seq_len - 1),
so every caption runs its full 30 tokens and each path does the same number of steps. Side by side in one process,
each repetition running every path in turn:

- "cached": `generate` as `predict.py --mode caption` runs it: one new token per step through nets/coca.py's
  CaptionSteps, the image tokens' keys and values made once;
- "whole prefix": the same `generate` with the cache turned off (what it ran before: every step the whole prefix);
- "open_clip": open_clip's CoCa forward in the loop its `generate` runs (image embeddings computed once, then
  `model(image, tokens, image_latent=..., image_embs=...)["logits"][:, -1]` per token), greedy, under
  `torch.inference_mode()`. open_clip 3.3's `generate` itself cannot import with transformers 5, so its loop is
  written out here around its own forward.

Greedy and beam search (open_clip's default: 6 beams in 3 identical groups, 2 searched). Every path's tokens are
compared before timing: equal in fp32 on the CPU (the run stops otherwise); elsewhere (TF32, fp16, bf16) rounding may
flip a near tie, so the captions that differ are counted and said. open_clip runs in fp32, on the same device.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clip import CLIP  # noqa: E402
from utils.predict.generate import Generation, generate  # noqa: E402


def open_clip_greedy(model, pixels: torch.Tensor, sot: int, eot: int, settings: Generation) -> torch.Tensor:
    """open_clip 3.3's `_generate` loop for generation_type="greedy" (argmax of the processed logits), written out."""
    image_latent, image_embs = model._encode_image(pixels)
    out = torch.full((pixels.shape[0], 1), sot, dtype=torch.long, device=pixels.device)
    while out.shape[1] < settings.seq_len:
        logits = model(pixels, out[:, -settings.max_seq_len:], image_latent=image_latent, image_embs=image_embs,
                       output_labels=False)["logits"][:, -1]
        if out.shape[1] < settings.min_seq_len:
            logits[:, eot] = -float("inf")
        token = torch.full_like(out[:, :1], eot) if out.shape[1] + 1 == settings.seq_len else logits.argmax(-1, True)
        out = torch.cat([out, token], dim=1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phi", default="coca_ViT-B-32")
    parser.add_argument("--images", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0: PyTorch's default (all cores)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CLIP(model_path="", phi=args.phi, cuda=args.device == "cuda", precision=args.precision)
    exact = args.device == "cpu" and args.precision == "fp32"
    net, tokenizer = model.net, model.tokenizer
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    peer = None
    try:
        import open_clip

        peer = open_clip.create_model(args.phi, pretrained=None).eval()
        peer.load_state_dict({k: v.float() for k, v in net.state_dict().items()}, strict=True)
        peer = peer.to(args.device)
    except ImportError:
        print("open_clip is not installed: its column is left out")
    uncached = type(net).caption_steps
    where = f"{torch.get_num_threads()} threads" if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"{args.phi}, {args.precision} on {args.device} ({where}), torch {torch.__version__}, median of {args.reps}")
    print("| images | search | cached | whole prefix | open_clip | whole prefix / cached | open_clip / cached |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n in args.images:
        size = net.config.vision.image_size
        pixels = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n))
        pixels = pixels.to(args.device, net.visual.conv1.weight.dtype)
        for search in ("greedy", "beam_search"):
            settings = Generation(generation=search, seq_len=30, min_seq_len=29)

            def cached():
                return generate(net, pixels, sot, eot, settings)

            def whole_prefix():
                type(net).caption_steps = lambda self, image_tokens, beams=1: None
                try:
                    return generate(net, pixels, sot, eot, settings)
                finally:
                    type(net).caption_steps = uncached

            paths = {"cached": cached, "whole prefix": whole_prefix}
            if peer is not None and search == "greedy":
                paths["open_clip"] = lambda: open_clip_greedy(peer, pixels.float(), sot, eot, settings)
            with torch.inference_mode():
                outputs = {name: run() for name, run in paths.items()}  # also the warm-up
                first = outputs["cached"]
                for name, o in outputs.items():
                    differ = n if o.shape != first.shape else int((o != first).any(dim=1).sum())
                    if differ and exact:
                        raise SystemExit(f"{search}: {name}'s tokens differ from the cached path's")
                    if differ:
                        print(f"{search}, {n} images: {differ} of {n} captions of {name} differ from cached's "
                              f"({args.precision} on {args.device}: rounding)")
                times = {name: [] for name in paths}
                for _ in range(args.reps):
                    for name, run in paths.items():
                        start = time.perf_counter()
                        run()
                        if args.device == "cuda":
                            torch.cuda.synchronize()
                        times[name].append(time.perf_counter() - start)
            ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
            theirs = f"{ms['open_clip']:.0f} ms" if "open_clip" in ms else "-"
            ratio = f"{ms['open_clip'] / ms['cached']:.2f}x" if "open_clip" in ms else "-"
            print(f"| {n} | {search} | {ms['cached']:.0f} ms | {ms['whole prefix']:.0f} ms | {theirs} | "
                  f"{ms['whole prefix'] / ms['cached']:.2f}x | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
