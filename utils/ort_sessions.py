"""The onnxruntime sessions that answer calls (nets/ort.py's runtime, predict_onnx's OnnxCLIP): one set of options.

Torch-free, so a deployment of an export needs only onnxruntime. A session's intra-op threads go on spinning after a
run by default, and on a small CPU they hold the cores that the other tower's session runs on next: an image and two
captions, as detect_image runs them, took 141-188 ms so and 81-109 ms with the threads stopped at the end of each run
(ViT-B/32, 2 AVX2 cores, interleaved in one process: benchmarks/bench_ort_threads.py). Within a run they spin as
onnxruntime's default has them, and one tower alone runs at the same speed. Turning spinning off altogether
(`session.intra_op.allow_spinning`) measured alike here. A thread pool shared by both sessions
(`set_global_thread_pool_sizes`) also measured alike, but it is process-wide: every later session in the process with
default options then fails ("use_per_session_threads must be false"), a user's own included.
"""
from __future__ import annotations

from pathlib import Path

from utils.errors import UserError

STOP_SPINNING = "session.force_spinning_stop"


def cpu_session(source: str | Path, threads: int, remedy: str):
    """An onnxruntime CPU session on the ONNX file `source` with `threads` intra-op threads (0: onnxruntime's
    choice) and onnxruntime's default graph optimisations (all), its threads stopped at the end of each run. A file
    onnxruntime cannot load is one line naming it, then `remedy`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry(STOP_SPINNING, "1")
    try:
        return ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for a truncated or foreign file
        raise UserError(f"onnxruntime cannot load {source} ({str(e).splitlines()[0][:200]}); {remedy}") from e
