"""Choosing the device and inference dtype, falling back with a warning where the machine can't comply."""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from utils.errors import UserError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(cuda: bool | None) -> torch.device:
    """cuda=None uses CUDA when present; cuda=True without CUDA warns and runs on the CPU."""
    available = torch.cuda.is_available()
    if cuda and not available:
        warnings.warn("Cuda=True but no CUDA device is visible; running on the CPU", stacklevel=2)
    return torch.device("cuda" if (available and cuda is not False) else "cpu")


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """None means fp16 on CUDA and fp32 on the CPU; fp16 on the CPU falls back to fp32 with a warning."""
    if precision is None:
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        warnings.warn("precision='fp16' needs CUDA; using fp32 on the CPU (bf16 is the fast CPU option)",
                      stacklevel=2)
        return "fp32"
    if precision == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # Without AVX-512 bf16 / AMX, PyTorch runs generic bf16 kernels: memory halves, speed drops ~10x.
        warnings.warn("precision='bf16' on a CPU without bf16 units runs PyTorch's fallback kernels, several "
                      "times slower than fp32 (it still halves memory); fp32 is the fast choice here", stacklevel=2)
    return precision


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for `dtype`; fp32 runs as it is, without an autocast region."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def loader_workers(requested: int | None, cap: int = 4) -> int:
    """DataLoader processes: the requested number, or (None) one per core this process may use, at most `cap`.

    More workers than cores only adds switching, and PyTorch warns about it on every loader it builds.
    """
    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cap, cores))
