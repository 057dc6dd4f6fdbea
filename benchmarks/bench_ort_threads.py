"""How onnxruntime's intra-op threads should wait between runs, for utils/ort_sessions.py: one tower alone and an
image then two captions (what detect_image runs), per session setting, interleaved in one process.

Settings: onnxruntime's default (threads spin on after a run), `session.force_spinning_stop` (spin within a run, stop
at its end: the house's), `session.intra_op.allow_spinning=0` (never spin). Each gets its own two sessions on the
same export (predict.py --mode export_onnx's files of seeded random weights); the settings take turns in every round,
in alternating order, each after a 50 ms pause, so drift and another setting's spinning threads fall on all alike.
A thread pool shared by the sessions (`set_global_thread_pool_sizes`) is process-wide and breaks every later session
with default options, so it is not a candidate here.

    PYTHONPATH=. python benchmarks/bench_ort_threads.py [--phi openai/VIT-B-32] [--rounds 12] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils.ort_sessions import STOP_SPINNING  # noqa: E402  (torch-free)

SETTINGS = {"spin on (default)": {}, "stop after a run (house)": {STOP_SPINNING: "1"},
            "never spin": {"session.intra_op.allow_spinning": "0"}}


def sessions(folder: Path, entries: dict, threads: int) -> tuple:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    for key, value in entries.items():
        options.add_session_config_entry(key, value)
    return tuple(ort.InferenceSession(str(folder / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
                 for name in ("image", "text"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phi", default="openai/VIT-B-32")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--reps", type=int, default=5, help="timed calls per setting and round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from clip import CLIP
    from utils.export.onnx_export import export_files, write_files
    from utils.tokenizer import trim_padding

    torch.manual_seed(0)
    model = CLIP(model_path="", phi=args.phi, cuda=False, precision="fp32", onednn=False)
    size = model.net.config.vision.image_size
    pixels = torch.randn(1, 3, size, size).numpy()
    captions = trim_padding(model.tokenize(["a photo of a temple", "a photo of a flower"]),
                            model.tokenizer.pad_token_id).numpy()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        write_files(folder, export_files(model, log=lambda line: None))
        opened = {name: sessions(folder, entries, args.threads) for name, entries in SETTINGS.items()}
        image_input = opened["spin on (default)"][0].get_inputs()[0].name
        text_input = opened["spin on (default)"][1].get_inputs()[0].name
        jobs = {"one image": lambda image, text: image.run(None, {image_input: pixels}),
                "one caption": lambda image, text: text.run(None, {text_input: captions[:1]}),
                "an image, then two captions": lambda image, text: (image.run(None, {image_input: pixels}),
                                                                     text.run(None, {text_input: captions}))}
        times = {(name, job): [] for name in SETTINGS for job in jobs}
        for round_ in range(args.rounds):
            for job, call in jobs.items():
                for name in (list(SETTINGS) if round_ % 2 else list(SETTINGS)[::-1]):
                    time.sleep(0.05)
                    call(*opened[name])  # untimed: the first run after the pause
                    for _ in range(args.reps):
                        start = time.perf_counter()
                        call(*opened[name])
                        times[(name, job)].append(time.perf_counter() - start)
    print(f"{args.phi}, fp32, {args.threads} intra-op threads, median ms over {args.rounds} x {args.reps} calls; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| call | " + " | ".join(SETTINGS) + " |")
    print("|---|" + "---:|" * len(SETTINGS))
    for job in jobs:
        print(f"| {job} | " + " | ".join(f"{statistics.median(times[(name, job)]) * 1000:.1f}" for name in SETTINGS)
              + " |")


if __name__ == "__main__":
    main()
