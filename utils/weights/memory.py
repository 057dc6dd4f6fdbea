"""How much memory a model's weights take, said before a load that needs much and refused in one line when it
cannot fit: a 10 GiB model on a 8 GiB machine should stop with a sentence, not be killed by the kernel midway."""
from __future__ import annotations

import functools
import sys
from itertools import chain
from pathlib import Path

import torch

from nets.clip import build_model
from nets.configs import CLIPConfig
from utils.errors import UserError

GiB = 2 ** 30
# Loads needing more than this say so before they start (the largest: EVA02-E, ViT-bigG, gopt).
ANNOUNCE_BYTES = 4 * GiB


@functools.lru_cache(maxsize=16)
def parameter_count(config: CLIPConfig) -> int:
    """Parameters and buffers of `config`'s model, counted on the meta device (nothing allocated); kept, as the RAM
    and the GPU checks of one load ask for the same count and EVA02-E's meta build takes seconds."""
    with torch.device("meta"):
        model = build_model(config)
    return sum(t.numel() for t in chain(model.parameters(), model.buffers()))


def free_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory a new allocation can take now on `device`: the GPU's free memory, or the RAM the kernel calls
    available, capped by this process's cgroup limit; None where the system does not say."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:  # cgroup v2: a container's limit is below the machine's memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = min(free, int(limit) - used) if free is not None else int(limit) - used
    except (OSError, ValueError):
        pass
    return free


def ensure_fits(need: int, what: str, device: torch.device | str = "cpu", announce: bool = True) -> None:
    """Refuse, in one line, a load of `need` more bytes that does not fit in `device`'s free memory; say the need
    first when it is large."""
    device = torch.device(device)
    free = free_bytes(device)
    where = "GPU memory" if device.type == "cuda" else "RAM"
    if free is not None and need > free:
        raise UserError(f"{what} needs about {need / GiB:.1f} GiB of {where} and {free / GiB:.1f} GiB is free: "
                        "close other programs, pick a smaller model, or use a machine with more memory"
                        + (" (or precision='bf16' or 'fp16', half the size)" if device.type == "cuda" else ""))
    if announce and need > ANNOUNCE_BYTES:
        free_text = f", {free / GiB:.1f} GiB free" if free is not None else ""
        print(f"{what}: about {need / GiB:.1f} GiB of {where}{free_text}", file=sys.stderr)


def load_need(config: CLIPConfig, file_bytes: int) -> int:
    """RAM a load of `config` from files of `file_bytes` peaks at: the fp32 model, plus the file's tensors while
    they are cast when it holds half-precision weights (smaller than the fp32 model)."""
    model_bytes = parameter_count(config) * 4
    return model_bytes + (file_bytes if file_bytes < 0.75 * model_bytes else 0)


def weight_files_bytes(path: Path) -> int:
    """Bytes of the weight files at `path` (a file, or a folder's safetensors/bin/pth files)."""
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir()
                   if f.is_file() and f.suffix in (".safetensors", ".bin", ".pth", ".pt"))
    return 0
