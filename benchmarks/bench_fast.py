"""CPU inference side by side in one process: plain PyTorch, the oneDNN path CLIP runs (nets/fast.py),
onnxruntime, CLIP(runtime="onnxruntime") (nets/ort.py: the same graphs behind our API) and open_clip, fp32 and
bf16, with the share of this CPU's measured matmul peak.

    python benchmarks/bench_fast.py [--phi openai/VIT-B-32] [--batch 1 32] [--reps 5] [--threads N]

Same seeded random weights everywhere (biases off their init). Peers at their best: open_clip under
`torch.inference_mode()` in eval mode; onnxruntime on `predict.py --mode export_onnx`'s files with every graph
optimisation (ORT_ENABLE_ALL) and padding columns trimmed. Captions are tokenised before timing. The last row is
what `detect_image` asks of the towers, one image then two captions, in calls per second. Each
repetition runs every encoder in turn, so load from other processes falls on all alike; rows are medians.
The matmul peak times one large product in each backend, before and after the workloads (the best of each
kept); "% peak" is a workload's FLOPs (counted by
torch.utils.flop_counter) per second over the best fp32 (or bf16) matmul rate. With bf16 units, one caption's
matmuls are also timed alone (its token count, the text tower's shapes, packed): the hardware's bf16/fp32 ratio at
the shapes a caption at batch 1 runs, where the weights stream from memory.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_inference import flickr_like_captions, open_clip_peer  # noqa: E402  (this folder)
from clip import CLIP  # noqa: E402
from nets.fast import accelerate  # noqa: E402
from nets.ort import OnnxRuntime  # noqa: E402


def _median_seconds(run, reps: int) -> float:
    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Without bf16 units (AVX-512 BF16 / AMX) oneDNN cannot build a bf16 matmul and PyTorch's generic bf16 kernels are
# several times slower than fp32: nothing there to measure against the hardware's ratio.
BF16_UNITS = torch.ops.mkldnn._is_mkldnn_bf16_supported()


def matmul_peak(reps: int) -> dict[str, float]:
    """GFLOP/s of one (1600 x 768) @ (768 x 3072) product, ViT-B's MLP at batch 32, in each backend."""
    m, k, n = 1600, 768, 3072
    flops = 2 * m * k * n
    rates = {}
    with torch.inference_mode():
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))[:2 if BF16_UNITS else 1]:
            x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
            rates[f"{name} F.linear"] = flops / _median_seconds(lambda: F.linear(x, w), reps) / 1e9
            rates[f"{name} oneDNN"] = flops / _median_seconds(
                lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), reps) / 1e9
    return rates


def caption_matmuls(model: CLIP, reps: int) -> tuple[int, float] | None:
    """(rows, bf16/fp32) of one batch-1 caption's matmuls alone: every text layer's QKV, output and MLP products at
    that caption's token count, packed, in the tower's order, so its weights stream as the tower's do. The
    hardware's ratio at the caption's own shapes, beside the large product's; None without bf16 units."""
    if not BF16_UNITS:
        return None
    text = model.net.config.text
    rows = int((model.tokenize(flickr_like_captions(1)) != model.tokenizer.pad_token_id).sum())
    width, mlp = text.width, int(text.width * text.mlp_ratio)
    shapes = [(3 * width, width), (width, width), (mlp, width), (width, mlp)] * text.layers
    seconds = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            weights = [torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k).to(dtype), None) for n, k in shapes]
            inputs = {k: torch.randn(rows, k).to(dtype) for k in (width, mlp)}
            seconds[dtype] = _median_seconds(lambda: [torch.ops.mkldnn._linear_pointwise(
                inputs[k], w, None, "none", [], "") for (_, k), w in zip(shapes, weights)], reps)
    return rows, seconds[torch.float32] / seconds[torch.bfloat16]


def randomised(phi: str) -> CLIP:
    torch.manual_seed(0)
    model = CLIP(model_path="", phi=phi, cuda=False, precision="fp32", onednn=False)
    with torch.no_grad():
        for p in model.net.parameters():
            if p.dim() == 1:
                p.normal_(float(p.mean()), 0.05)
    return model


def encoders(model: CLIP, threads: int) -> dict[str, dict]:
    """{name: {"image": f, "text": f}} over torch tensors, each returning float32 features."""
    from utils.export.onnx_export import export_files, write_files
    from utils.export.onnx_predict import OnnxCLIP

    def towers(net: nn.Module, dtype=torch.float32) -> dict:
        return {"image": lambda p: net.encode_image(p.to(dtype)).float(), "text": lambda t: net.encode_text(t).float()}

    fast = copy.deepcopy(model.net)
    accelerate(fast)
    found = {"eager": towers(model.net), "fast": towers(fast)}
    folder = tempfile.mkdtemp()
    write_files(Path(folder), export_files(model, log=lambda line: None))
    onnx = OnnxCLIP(folder, threads=threads)  # onnxruntime's default level is ORT_ENABLE_ALL: every fusion
    found["onnxruntime"] = {"image": lambda p: torch.from_numpy(onnx.encode_image(p.numpy())),
                            "text": lambda t: torch.from_numpy(onnx.encode_text(t.numpy()))}
    peer = open_clip_peer(model.net.config, model.net.state_dict())
    if peer is not None:
        found["open_clip"] = towers(peer)
    # CLIP(runtime="onnxruntime"): the same graphs behind our API (net.encode_image / encode_text), exported to a
    # fresh cache here. Both it and the onnxruntime peer stop their threads after each run (utils/ort_sessions.py),
    # so neither slows the encoder timed next.
    behind = copy.deepcopy(model.net)
    behind.runtime = OnnxRuntime(Path(folder) / "cache", model.tokenizer.pad_token_id, threads, log=lambda line: None)
    found["runtime onnxruntime"] = towers(behind)
    pixels = torch.randn(1, 3, model.net.config.vision.image_size, model.net.config.vision.image_size)
    with torch.inference_mode():  # its steady state: the export looked up (second call), then written (third)
        for _ in range(3):
            found["runtime onnxruntime"]["image"](pixels), found["runtime onnxruntime"]["text"](model.tokenize("a dog"))
            behind.runtime.wait()
    if not BF16_UNITS:
        return found
    bf16 = copy.deepcopy(model.net).bfloat16()
    found["eager bf16"] = towers(bf16, torch.bfloat16)
    fast_bf16 = copy.deepcopy(bf16)
    accelerate(fast_bf16)
    found["fast bf16"] = towers(fast_bf16, torch.bfloat16)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phi", default="openai/VIT-B-32")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0: PyTorch's default (all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load_before = os.getloadavg()[0]
    peak = matmul_peak(args.reps)
    model = randomised(args.phi)
    run = encoders(model, threads)
    caption = caption_matmuls(model, max(args.reps, 9))
    size = model.net.config.vision.image_size
    captions = flickr_like_captions(max(args.batch))
    workloads = []  # (label, batch, encode(towers) -> features)
    for kind in ("image", "text"):
        for batch in args.batch:
            given = (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
                     if kind == "image" else model.tokenize(captions[:batch]))
            workloads.append((f"{kind}s", batch, lambda towers, kind=kind, given=given: towers[kind](given)))
    # What detect_image asks of the towers: one image, then two captions (a session may slow the next one).
    one, two = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)), model.tokenize(captions[:2])
    workloads.append(("image + 2 captions", 1, lambda towers: torch.cat([towers["image"](one),
                                                                         towers["text"](two)])))
    rows = []
    for label, batch, encode in workloads:
        with torch.inference_mode():
            with FlopCounterMode(display=False) as counter:
                want = encode(run["eager"])
            flops = counter.get_total_flops()
            times = {name: [] for name in run}
            diffs = {}
            for name, towers in run.items():
                diffs[name] = (encode(towers) - want).abs().max().item()  # also the warm-up
            for _ in range(args.reps):
                for name, towers in run.items():
                    start = time.perf_counter()
                    encode(towers)
                    times[name].append(time.perf_counter() - start)
        rows.append((label, batch, flops, {name: statistics.median(t) for name, t in times.items()}, diffs))
        print(f"{label} at batch {batch}: " + ", ".join(f"{n} {batch / statistics.median(t):.1f}/s"
                                                      for n, t in times.items()), flush=True)

    # Measured again after the workloads, keeping each best: on a shared machine the load moves between the two.
    peak = {name: max(rate, again) for (name, rate), again in zip(peak.items(), matmul_peak(args.reps).values())}
    fp32_peak = max(peak["fp32 F.linear"], peak["fp32 oneDNN"])
    bf16_peak = max(peak.get("bf16 F.linear", 0.0), peak.get("bf16 oneDNN", 0.0))
    if not BF16_UNITS:
        print("no bf16 units on this CPU (AVX-512 BF16 / AMX): bf16 columns left out")
    print(f"{args.phi}, {threads} threads, torch {torch.__version__}, median of {args.reps}; load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores")
    print("matmul 1600x768x3072 GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peak.items())
          + (f"; bf16/fp32 {bf16_peak / fp32_peak:.2f}x" if BF16_UNITS else ""))
    if caption is not None:
        print(f"one caption's {caption[0]}-row matmuls alone, packed: bf16/fp32 {caption[1]:.2f}x")
    names = list(run)
    bf16 = ["fast bf16 / fast", "% bf16 peak (fast bf16)"] if BF16_UNITS else []
    columns = (names + ["fast / onnxruntime", "runtime onnxruntime / onnxruntime"] + bf16[:1]
               + ["% fp32 peak (eager, fast)"] + bf16[1:])
    print("| per second | batch | " + " | ".join(columns) + " | max abs diff from eager (fast, onnxruntime, runtime "
          "onnxruntime) |")
    print("|---|---:|" + "---:|" * len(columns) + "---|")
    for label, batch, flops, times, diffs in rows:
        speed = {name: batch / t for name, t in times.items()}
        share = {name: flops / times[name] / 1e9 for name in names}
        cells = [f"{speed[n]:.1f}" for n in names] + [f"{speed['fast'] / speed['onnxruntime']:.2f}x",
                                                      f"{speed['runtime onnxruntime'] / speed['onnxruntime']:.2f}x"]
        cells += [f"{speed['fast bf16'] / speed['fast']:.2f}x"] if BF16_UNITS else []
        cells += [f"{100 * share['eager'] / fp32_peak:.0f}%, {100 * share['fast'] / fp32_peak:.0f}%"]
        cells += [f"{100 * share['fast bf16'] / bf16_peak:.0f}%"] if BF16_UNITS else []
        print(f"| {label} | {batch} | " + " | ".join(cells) + f" | {diffs['fast']:.1e}, {diffs['onnxruntime']:.1e}, "
              f"{diffs['runtime onnxruntime']:.1e} |")


if __name__ == "__main__":
    main()
