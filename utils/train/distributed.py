"""torchrun process groups: nccl on GPUs, gloo on CPUs; rank 0 does the talking and the saving."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(enabled: bool, use_cuda: bool) -> DistInfo:
    """Join the torchrun group when `enabled` and launched by torchrun; otherwise a single process."""
    if not enabled or "RANK" not in os.environ:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return info


def cleanup(info: DistInfo) -> None:
    # A group of one (torchrun --nproc_per_node 1) was joined too, and nccl warns of a leak at exit if it is not left.
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_across(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= info.world_size
    return value


def all_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Every rank must take the same branch around collective ops (backward in DDP), so they vote."""
    if not info.enabled:
        return flag
    vote = torch.tensor(float(flag), device=device)
    dist.all_reduce(vote, op=dist.ReduceOp.MIN)
    return bool(vote.item())
