"""Training-step throughput and peak memory: this repo's model + loss + optimiser vs open_clip's, same weights.

    python benchmarks/bench_train.py [--phi tiny/VIT-T-8 openai/VIT-B-32] [--batch 32] [--steps 5]
                                     [--device cuda] [--precision fp32|fp16|bf16] [--loss softmax|sigmoid]

`--loss sigmoid` trains SigLIP models with the sigmoid loss (ours: utils/train/loss.SigLipLoss; open_clip's:
its `SigLipLoss`), open_clip's built by its `create_model` with our weights loaded strictly (the keys are
open_clip's for SigLIP). Its default phi is `small-siglip2`, a 4-block, 256-wide SigLIP 2 on 128 px (both
sides build its trunk as timm's SigLIP ViT at those sizes); any SigLIP row of the model table works too
(`--phi ViT-B-16-SigLIP2 --batch 8`).

Both sides train under the same precision: fp32, or autocast to fp16 (with a GradScaler, CUDA) or bf16.

Speed is measured in one process, the two steps interleaved so both see the same machine load. Peak memory
is measured in a fresh child process per implementation (CUDA: max_memory_allocated; CPU: the growth of the
process's peak RSS (VmHWM) from after the imports: model, gradients, optimiser state and activations).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nets import build_model, get_config  # noqa: E402
from utils.train.loss import ClipLoss, SigLipLoss  # noqa: E402
from utils.train.optim import build_optimizer  # noqa: E402

from peers import open_clip_model  # noqa: E402  (benchmarks/, this script's folder)

# A name timm does not know, for a small SigLIP ViT: timm's SigLIP ViT entry point at these sizes builds it.
SMALL_TRUNK, TRUNK_OVERRIDES = "vit_small_bench_siglip_128", dict(embed_dim=256, depth=4, num_heads=4, img_size=128)
# open_clip's JSON for small-siglip2: ViT-B-16-SigLIP2's settings with 4 blocks of 256 and a 32,000-token vocabulary.
SMALL_SIGLIP = {"small-siglip2": dict(
    embed_dim=256, init_logit_bias=-10, custom_text=True,
    vision_cfg=dict(image_size=128, timm_model_name=SMALL_TRUNK, timm_model_pretrained=False, timm_pool="map",
                    timm_proj="none"),
    text_cfg=dict(context_length=64, vocab_size=32000, width=256, heads=4, layers=4, no_causal_mask=True,
                  proj_bias=True, pool_type="last", norm_kwargs={"eps": 1e-6}, act_kwargs={"approximate": "tanh"}))}


def register_small_siglip() -> None:
    """Teach timm the small trunk and open_clip its config (idempotent; both sides then build small-siglip2)."""
    import open_clip
    import timm

    if getattr(timm.create_model, "small_trunk", False):
        return
    create = timm.create_model

    def create_model(name, *args, **kwargs):
        if name == SMALL_TRUNK:
            return create("vit_base_patch16_siglip_224", *args, **{**kwargs, **TRUNK_OVERRIDES})
        return create(name, *args, **kwargs)

    create_model.small_trunk = True
    timm.create_model = create_model
    open_clip.factory._MODEL_CONFIGS.update(SMALL_SIGLIP)


def config_of(phi: str):
    if phi in SMALL_SIGLIP:
        from nets.open_clip_configs import from_open_clip

        register_small_siglip()
        return from_open_clip(SMALL_SIGLIP[phi])
    return get_config(phi)


def inputs(config, batch: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    tokens = torch.zeros(batch, config.text.context_length, dtype=torch.long)
    for i in range(batch):  # Flickr-length captions: 10-20 tokens
        n = int(torch.randint(10, 21, (1,), generator=g))
        if config.text.kind == "siglip":  # sentencepiece ids, then padding (id 1) to the context length
            tokens[i, :n], tokens[i, n:] = torch.randint(2, config.text.vocab_size, (n,), generator=g), 1
        else:
            tokens[i, 0], tokens[i, 1:n + 1] = 49406, torch.randint(1, 49000, (n,), generator=g)
            tokens[i, n + 1] = 49407
    return pixels.to(device), tokens.to(device)


def training_step(model, optimizer, loss_fn, device: torch.device, precision: str):
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step(pixels, tokens):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(*model(pixels, tokens))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def ours_step(phi: str, device: torch.device, precision: str = "fp32", loss: str = "softmax"):
    model = build_model(config_of(phi)).to(device).train()
    optimizer = build_optimizer(model, "adamw", 1e-5, 0.9, 0.1)
    return model, training_step(model, optimizer, SigLipLoss() if loss == "sigmoid" else ClipLoss(), device, precision)


def peer_step(phi: str, device: torch.device, state_dict, precision: str = "fp32", loss: str = "softmax"):
    import open_clip

    if loss == "sigmoid":
        config_of(phi)  # registers small-siglip2 with open_clip
        model = open_clip.create_model(phi, pretrained=None)
        if state_dict is not None:  # SigLIP's keys are open_clip's on both sides
            model.load_state_dict(state_dict, strict=True)
    else:
        model = open_clip_model(get_config(phi))
        if state_dict is not None:
            model.load_state_dict(state_dict, strict=False)
    model = model.to(device).train()
    # open_clip's trainer: AdamW with the same no-decay split, torch's default (foreach) implementation.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-5, betas=(0.9, 0.98), eps=1e-6)
    criterion = open_clip.loss.SigLipLoss() if loss == "sigmoid" else open_clip.ClipLoss()
    return model, training_step(model, optimizer, criterion, device, precision)


def peak_memory_child(impl: str, phi: str, batch: int, steps: int, device: str, precision: str,
                      loss: str = "softmax") -> float:
    """MiB of peak memory for `steps` training steps of `impl`, measured in a fresh process."""
    code = (f"import sys; sys.argv=['x']; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_train as b; "
            f"print(b.measure_memory({impl!r}, {phi!r}, {batch}, {steps}, {device!r}, {precision!r}, {loss!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _peak_rss_mib() -> float:
    # VmHWM belongs to this process's memory map, which exec replaces. ru_maxrss does not start afresh: a
    # child inherits its parent's peak, which would hide the child's own growth under the parent's.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def measure_memory(impl: str, phi: str, batch: int, steps: int, device: str, precision: str = "fp32",
                   loss: str = "softmax") -> float:
    device = torch.device(device)
    # The baseline is the process after imports, before the model: both sides then count weights, gradients,
    # optimiser state and activations. Values do not change memory, so neither side loads the other's weights.
    base = _peak_rss_mib()
    torch.manual_seed(0)
    model, step = (ours_step(phi, device, precision, loss) if impl == "ours"
                   else peer_step(phi, device, None, precision, loss))
    pixels, tokens = inputs(config_of(phi), batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = 0
    for _ in range(steps):
        step(pixels, tokens)
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return _peak_rss_mib() - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phi", nargs="+", help="default: tiny/VIT-T-8 openai/VIT-B-32; with --loss sigmoid: "
                        "small-siglip2")
    parser.add_argument("--loss", default="softmax", choices=["softmax", "sigmoid"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    args.phi = args.phi or (["small-siglip2"] if args.loss == "sigmoid" else ["tiny/VIT-T-8", "openai/VIT-B-32"])
    device = torch.device(args.device)
    try:
        import open_clip  # noqa: F401
    except ImportError:
        print("open_clip is not installed (pip install -r benchmarks/requirements.txt): nothing to compare with")
        return
    rows = []
    for phi in args.phi:
        torch.manual_seed(0)
        ours, step_ours = ours_step(phi, device, args.precision, args.loss)
        _, step_peer = peer_step(phi, device, ours.state_dict(), args.precision, args.loss)
        pixels, tokens = inputs(ours.config, args.batch, device)
        times, first_loss = {"ours": [], "open_clip": []}, {}
        for i in range(args.steps + 1):
            for name, step in (("ours", step_ours), ("open_clip", step_peer)):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                loss = step(pixels, tokens)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i:  # the first step is warm-up
                    times[name].append(time.perf_counter() - start)
                else:  # same weights and inputs: the same first loss, or the two do not train the same model
                    first_loss[name] = loss.item()
        row = {"phi": phi, "batch": args.batch, "device": str(device), "precision": args.precision, "loss": args.loss}
        for name in times:
            row[f"{name}_samples_per_s"] = args.batch / statistics.median(times[name])
        row["speed_ratio"] = row["ours_samples_per_s"] / row["open_clip_samples_per_s"]
        row["first_loss_diff"] = abs(first_loss["ours"] - first_loss["open_clip"])
        del ours, step_ours, step_peer
        if not args.no_memory:
            for name in ("ours", "open_clip"):
                row[f"{name}_peak_mib"] = peak_memory_child(name, phi, args.batch, 2, args.device, args.precision,
                                                            args.loss)
            row["memory_ratio"] = row["ours_peak_mib"] / max(row["open_clip_peak_mib"], 1e-9)
        rows.append(row)
        print(json.dumps(row))
    print(f"\n{args.device}, {args.precision}, loss={args.loss}, median of {args.steps} steps after 1 warm-up")
    print(f"{'phi':<18}{'batch':>6}{'ours/s':>10}{'open_clip/s':>13}{'speed x':>9}{'ours MiB':>10}"
          f"{'open_clip MiB':>15}{'mem x':>7}")
    for r in rows:
        print(f"{r['phi']:<18}{r['batch']:>6}{r['ours_samples_per_s']:>10.1f}{r['open_clip_samples_per_s']:>13.1f}"
              f"{r['speed_ratio']:>9.2f}{r.get('ours_peak_mib', float('nan')):>10.0f}"
              f"{r.get('open_clip_peak_mib', float('nan')):>15.0f}{r.get('memory_ratio', float('nan')):>7.2f}")


if __name__ == "__main__":
    main()
