"""Time our CLIP's encoders (on the CPU, nets/fast.py's oneDNN path, as CLIP runs them) against open_clip and
transformers (SDPA attention) with the same weights, in one process.

    python benchmarks/bench_inference.py [--phi openai/VIT-B-32] [--reps 3] [--threads N] [--quick] [--device cuda]
    python benchmarks/bench_inference.py --phi ViT-B-16-SigLIP2   # SigLIP: open_clip's create_model as the peer

Rows: text (captions of Flickr length, encoded in batches), images in fp32 (a batch and a single image),
and our model cast to bf16 as `CLIP(precision="bf16")` does (on CUDA, fp16 too). Each time is the median
of --reps runs after warm-up runs; "x" columns are speed-ups, peer time / our time, so above 1 means ours
is faster. The last column is the largest absolute difference from the peer's features (fp32) or the
smallest cosine similarity to our fp32 features (bf16, fp16). Peers that are not installed are skipped
with a note. SigLIP phis (timm image tower, SigLIP text tower) take open_clip's own model of that name with our
state dict loaded strictly (the keys are open_clip's); their captions are token ids padded to the context length,
as SigLIP's tokenizers pad them (the tower runs every position whatever the ids), and the workload is smaller
(--captions, --image-batches) because a ViT-B/16 costs four times a ViT-B/32.

    python benchmarks/bench_inference.py --families [NAME ...] [--reps 3] [--threads 2]

One architecture per family (FAMILY_PHIS: OpenAI ViT and ResNet, SigLIP, EVA, ConvNeXt, ViTamin, PE-Core, MobileCLIP,
CLIPA, MobileCLIP's FastViT, CoCa, HF text) against open_clip's `create_model` of the same name with our state dict
loaded strictly, one process, both in fp32 under inference_mode with the same threads, batched; a table of images/s
and captions/s and their ratios.
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from nets import CLIPConfig, MODEL_CONFIGS, build_model, get_config  # noqa: E402
from nets.fast import accelerate  # noqa: E402
from utils.tokenizer import BPETokenizer  # noqa: E402

from peers import open_clip_model  # noqa: E402  (benchmarks/, this script's folder)

Encoder = Callable[[torch.Tensor], torch.Tensor]

# Flickr8k captions average about 12 words; these parts combine into 8-20 words with a similar mean.
_SUBJECTS = ["a dog", "a brown dog", "two dogs", "a black and white dog", "a little girl", "a young boy",
             "a man", "a woman", "an old man", "a woman in a red jacket", "a man wearing a black hat",
             "a group of people", "three children", "a little girl in a pink dress", "a skier", "a surfer",
             "a cyclist", "a boy in a blue shirt", "two young men", "a crowd of people", "a climber"]
_PLURAL = {"two dogs", "a group of people", "three children", "two young men", "a crowd of people"}
_ACTIONS = ["running", "jumping", "playing", "walking", "sitting", "standing", "riding a bike",
            "climbing a rock wall", "swimming", "throwing a ball", "looking at the camera",
            "holding a stick", "splashing", "catching a frisbee", "smiling"]
_PLACES = ["on the beach", "in the snow", "through the grass", "down a dirt road", "in front of a building",
           "near the water", "on a busy city street", "in a park", "at the top of a hill", "in a field",
           "on a wooden bench", "in a swimming pool", "along the shore", "across a river"]
_EXTRAS = ["", "", "", "", "while another dog watches", "with a tennis ball in its mouth", "under a clear blue sky",
           "at sunset", "with trees in the background", "as people watch", "next to a red car",
           "while wearing sunglasses", "on a cold winter day"]


def flickr_like_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    captions: list[str] = []
    while len(captions) < n:
        subject = rng.choice(_SUBJECTS)
        verb = "are" if subject in _PLURAL else "is"
        words = " ".join([subject, verb] + [rng.choice(part) for part in (_ACTIONS, _PLACES, _EXTRAS)]).split()
        if 8 <= len(words) <= 20:
            captions.append(" ".join(words).capitalize() + " .")  # Flickr's captions end in a spaced full stop
    return captions


def open_clip_peer(config: CLIPConfig, state_dict: dict) -> nn.Module | None:
    try:
        peer = open_clip_model(config)
    except ImportError:
        return None
    # Same key names as OpenAI's; open_clip's causal mask is a non-persistent buffer, so strict holds.
    peer.load_state_dict(state_dict, strict=True)
    return peer.eval()


def open_clip_siglip_peer(phi: str, state_dict: dict) -> nn.Module | None:
    try:
        import open_clip
    except ImportError:
        return None
    peer = open_clip.create_model(phi, pretrained=None)
    peer.load_state_dict(state_dict, strict=True)
    return peer.eval()


def transformers_peer(config: CLIPConfig, state_dict: dict) -> nn.Module | None:
    try:
        import transformers
    except ImportError:
        return None
    from utils.weights.layouts import openai_to_transformers, transformers_config

    hf_config = transformers_config(config)
    hf_config._attn_implementation = "sdpa"  # transformers' documented fast attention (its default too)
    peer = transformers.CLIPModel(hf_config)
    missing, unexpected = peer.load_state_dict(openai_to_transformers(state_dict), strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    return peer.eval()


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projected features.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _encode_all(encode: Encoder, batches: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([_features(encode(batch)).float() for batch in batches])


def side_by_side(encoders: dict[str, Encoder], batches: list[torch.Tensor], reps: int,
                 warmup: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Median seconds to encode all `batches`, and the features, for every encoder.

    Warm-up runs see the first batch only: they pay first-call costs (allocator growth, oneDNN
    primitive creation), not the workload. Repetitions interleave the encoders, so that load from
    other processes falls on all of them alike.
    """
    for encode in encoders.values():
        for _ in range(warmup):
            _encode_all(encode, batches[:1])
    timings: dict[str, list[float]] = {name: [] for name in encoders}
    features: dict[str, torch.Tensor] = {}
    for _ in range(reps):
        for name, encode in encoders.items():
            start = time.perf_counter()
            features[name] = _encode_all(encode, batches)
            if features[name].is_cuda:  # kernels run asynchronously: wait for them before reading the clock
                torch.cuda.synchronize()
            timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in timings.items()}, features


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} s" if value >= 1 else f"{value * 1e3:.0f} ms"


def _speed_up(peer: float | None, ours: float) -> str:
    return "-" if peer is None else f"{peer / ours:.2f}x"


# One real architecture per family, the smallest open_clip has (CLIPA's is a ViT-L/14), with the images per batch
# that keep a family's run to about a minute on two loaded cores.
FAMILY_PHIS = {"OpenAI ViT": ("ViT-B-32", 8), "OpenAI ResNet": ("RN50", 8), "SigLIP": ("ViT-B-16-SigLIP", 4),
               "EVA": ("EVA02-B-16", 4), "ConvNeXt": ("convnext_base", 4), "ViTamin": ("ViTamin-S", 4),
               "PE-Core": ("PE-Core-T-16-384", 4), "MobileCLIP": ("MobileCLIP-B", 4), "CLIPA": ("ViT-L-14-CLIPA", 2),
               "MobileCLIP FastViT": ("MobileCLIP2-S0", 4), "CoCa": ("coca_ViT-B-32", 4),
               "HF text": ("xlm-roberta-base-ViT-B-32", 4),
               # 1.9B parameters (XLM-V's 901,629-token embedding is half): two side by side need about 16 GB.
               "MetaCLIP 2": ("ViT-H-14-worldwide", 1)}


class _RowConfig:
    """open_clip's AutoConfig for an HF text tower, answering from_pretrained with the row's transformers config
    (the hub's config.json is not reachable here; the row holds its sizes)."""

    def __init__(self, hf_config):
        self.hf_config = hf_config

    def from_pretrained(self, *args, **kwargs):
        return self.hf_config


def family_tokens(config: CLIPConfig, n: int) -> torch.Tensor:
    """Captions as the family's tower takes them: BPE ids of Flickr-like captions for a causal tower (ours trims
    after EOT, the peer runs the whole context), else ids padded to the context (every position runs on both)."""
    text = config.text
    if text.kind in ("openai", "openai-custom") and text.causal and not text.tokenizer:
        return BPETokenizer(context_length=text.context_length)(flickr_like_captions(n))
    if text.pool == "eos":  # MetaCLIP 2: ids of a Flickr-like caption's length, its </s>, then padding
        lengths = (BPETokenizer(context_length=text.context_length)(flickr_like_captions(n)) != 0).sum(1)
        tokens = torch.randint(3, text.vocab_size, (n, text.context_length), generator=torch.Generator().manual_seed(0))
        for row, length in zip(tokens, lengths.tolist()):
            row[length - 1], row[length:] = text.eos_id, text.pad_id
        return tokens
    return torch.randint(1, text.vocab_size, (n, text.context_length), generator=torch.Generator().manual_seed(0))


def family_row(family: str, reps: int, warmup: int, n_captions: int) -> dict:
    import open_clip

    phi, image_batch = FAMILY_PHIS[family]
    torch.manual_seed(0)
    config = get_config(phi)
    ours = build_model(config).eval()
    for p in ours.parameters():  # biases and gains off their 0/1 init, so that every parameter counts
        if p.dim() == 1:
            nn.init.normal_(p, mean=float(p.detach().mean()), std=0.05)
    extra = {}
    if config.text.kind == "hf":  # open_clip reads the tower's config from the hub, and its weights unless told not to
        import open_clip.hf_model
        from nets.text_hf import transformers_config

        open_clip.hf_model.AutoConfig = _RowConfig(transformers_config(config.text))
        extra = dict(pretrained_text=False)
    peer = open_clip.create_model(phi, pretrained=None, **extra).eval()
    peer.load_state_dict(ours.state_dict(), strict=True)  # open_clip's keys on both sides
    accelerate(ours)  # what CLIP runs on the CPU (nets/fast.py)
    tokens = family_tokens(config, n_captions)
    size = config.vision.image_size
    pixels = torch.randn(image_batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        text_times, text_features = side_by_side({"ours": ours.encode_text, "open_clip": peer.encode_text},
                                                 list(tokens.split(32)), reps, warmup)
        image_times, image_features = side_by_side({"ours": ours.encode_image, "open_clip": peer.encode_image},
                                                   [pixels], reps, warmup)
    return dict(family=family, phi=phi, image_batch=image_batch, captions=n_captions,
                images=(image_batch / image_times["ours"], image_batch / image_times["open_clip"]),
                texts=(n_captions / text_times["ours"], n_captions / text_times["open_clip"]),
                # normalised: open_clip's CoCa.encode_* normalise by default, its CLIP's do not
                diff=max((F.normalize(image_features["ours"], dim=-1) - F.normalize(image_features["open_clip"], dim=-1))
                         .abs().max().item(),
                         (F.normalize(text_features["ours"], dim=-1) - F.normalize(text_features["open_clip"], dim=-1))
                         .abs().max().item()))


def families_main(names: list[str], reps: int, warmup: int, threads: int, n_captions: int) -> None:
    unknown = [n for n in names if n not in FAMILY_PHIS]
    if unknown:
        raise SystemExit(f"unknown families {unknown}; known: {', '.join(FAMILY_PHIS)}")
    torch.set_num_threads(threads)
    print(f"{threads} threads, {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, fp32, median of "
          f"{reps} after {warmup} warm-up, captions in batches of 32")
    print("| family | phi | images/s ours | open_clip | ratio | captions/s ours | open_clip | ratio | max abs diff |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name in names or list(FAMILY_PHIS):
        row = family_row(name, reps, warmup, n_captions)
        (image_ours, image_peer), (text_ours, text_peer) = row["images"], row["texts"]
        print(f"| {name} | {row['phi']} (images batch {row['image_batch']}) | {image_ours:.2f} | {image_peer:.2f} | "
              f"{image_ours / image_peer:.2f}x | {text_ours:.1f} | {text_peer:.1f} | {text_ours / text_peer:.2f}x | "
              f"{row['diff']:.1e} |", flush=True)


def main() -> None:
    if "--families" in sys.argv:
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--families", nargs="*", default=[], help=f"default: all of {', '.join(FAMILY_PHIS)}")
        parser.add_argument("--reps", type=int, default=3)
        parser.add_argument("--warmup", type=int, default=1)
        parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
        parser.add_argument("--captions", type=int, default=64)
        args = parser.parse_args()
        families_main(args.families, args.reps, args.warmup, args.threads, args.captions)
        return
    openai_text_phis = [phi for phi in MODEL_CONFIGS if get_config(phi).text.kind in ("openai", "siglip")]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phi", default="openai/VIT-B-32", choices=openai_text_phis,
                        help="an architecture with OpenAI's text tower (both peers) or a SigLIP one (open_clip)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per encoder first")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores")
    parser.add_argument("--quick", action="store_true", help="a fast sanity run: 128 captions, images 4 and 1")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers peer")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--captions", type=int, help="captions encoded (default 1024, 128 with --quick or SigLIP)")
    parser.add_argument("--image-batches", type=int, nargs="+", help="default 32 1 (4 1 with --quick, 8 1 SigLIP)")
    args = parser.parse_args()
    siglip = get_config(args.phi).text.kind == "siglip"
    n_captions, text_batch, image_batches = (128, 64, (4, 1)) if args.quick else \
        (128, 32, (8, 1)) if siglip else (1024, 256, (32, 1))
    n_captions = args.captions or n_captions
    image_batches = tuple(args.image_batches or image_batches)
    if args.device == "cuda" and not args.quick:
        image_batches = (256, 32, 1)
    device = torch.device(args.device)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = get_config(args.phi)
    ours = build_model(config).eval().to(device)
    for p in ours.parameters():  # biases and gains off their 0/1 init, so that every parameter counts
        if p.dim() == 1:
            nn.init.normal_(p, mean=float(p.detach().mean()), std=0.05)
    state_dict = ours.state_dict()
    if device.type == "cpu":
        accelerate(ours)  # what CLIP runs on the CPU (nets/fast.py)
    peers = {"open_clip": open_clip_siglip_peer(args.phi, state_dict) if siglip else open_clip_peer(config, state_dict)}
    resnet = config.vision.kind == "resnet"
    if not args.no_transformers and not resnet and not siglip:
        peers["transformers"] = transformers_peer(config, state_dict)
    notes = [f"{name} is not installed: its columns are skipped" for name, peer in peers.items() if peer is None]
    if resnet and not args.no_transformers:
        notes.append("transformers has no CLIP with OpenAI's ResNet image tower: its columns are skipped")
    if siglip and not args.no_transformers:
        notes.append("transformers' SiglipModel is not timed here (open_clip's is the model these keys load into)")
    peers = {name: peer.to(device) for name, peer in peers.items() if peer is not None}
    # What CLIP(precision=...) runs: the whole model cast. fp16 is offered on CUDA only.
    low_precision = [torch.bfloat16] if device.type == "cpu" else [torch.float16, torch.bfloat16]
    cast = {dtype: copy.deepcopy(ours).to(dtype) for dtype in low_precision}

    captions = flickr_like_captions(n_captions)
    if siglip:  # padded to the context length: every caption costs the same whatever its ids
        tokens = torch.randint(1, config.text.vocab_size, (n_captions, config.text.context_length),
                               generator=torch.Generator().manual_seed(0))
    else:
        tokens = BPETokenizer()(captions)
        lengths = tokens.argmax(dim=-1) + 1  # SOT .. EOT
    text_batches = list(tokens.to(device).split(text_batch))
    size = config.vision.image_size
    pixels = torch.randn(max(image_batches), 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)

    text_encoders: dict[str, Encoder] = {"ours": ours.encode_text}
    image_encoders: dict[str, Encoder] = {"ours": ours.encode_image}
    for name, peer in peers.items():
        if name == "transformers":
            text_encoders[name] = lambda t, peer=peer: peer.get_text_features(input_ids=t)
            image_encoders[name] = lambda p, peer=peer: peer.get_image_features(pixel_values=p)
        else:
            text_encoders[name], image_encoders[name] = peer.encode_text, peer.encode_image

    rows = []
    with torch.inference_mode():
        label = f"text {n_captions} captions, batch {text_batch}"
        times, features = side_by_side(text_encoders, text_batches, args.reps, args.warmup)
        rows.append((label, times, {n: (features[n] - features["ours"]).abs().max().item() for n in peers}))
        for batch in image_batches:
            images = [pixels[:batch]]
            times, features = side_by_side(image_encoders, images, args.reps, args.warmup)
            fp32_features = features["ours"]
            rows.append((f"image fp32, batch {batch}", times,
                         {n: (features[n] - fp32_features).abs().max().item() for n in peers}))
            for dtype, model in cast.items():
                low_times, low_features = side_by_side(
                    {"ours": lambda p, model=model, dtype=dtype: model.encode_image(p.to(dtype))}, images,
                    args.reps, args.warmup)
                cosine = F.cosine_similarity(low_features["ours"], fp32_features, dim=-1).min().item()
                name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
                rows.append((f"image {name} (peers fp32), batch {batch}", {**times, "ours": low_times["ours"]},
                             {"min cosine to our fp32": cosine}))

    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    print(f"{args.phi}, {hardware}, torch {torch.__version__}, median of {args.reps} after {args.warmup} warm-up")
    if siglip:
        print(f"captions: {tokens.shape[1]} token ids each, padded as SigLIP's tokenizers pad them; both run them all")
    else:
        print(f"captions: {lengths.float().mean():.1f} tokens on average with SOT/EOT, longest per batch "
              f"{[int(lengths[i:i + text_batch].max()) for i in range(0, n_captions, text_batch)]}; peers run all "
              f"{tokens.shape[1]} positions")
    header = f"{'workload':<36}{'ours':>10}" + "".join(f"{name:>14}{'x':>8}" for name in peers) + "   agreement"
    print(header)
    print("-" * len(header))
    for label, times, agreement in rows:
        line = f"{label:<36}{_seconds(times['ours']):>10}"
        line += "".join(f"{_seconds(times.get(n)):>14}{_speed_up(times.get(n), times['ours']):>8}" for n in peers)
        if "min cosine to our fp32" in agreement:
            line += f"   min cosine to our fp32 {agreement['min cosine to our fp32']:.6f}"
        elif agreement:
            line += "   max|diff| " + ", ".join(f"{n} {d:.1e}" for n, d in agreement.items())
        print(line)
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
