"""Optimiser, decay groups and the per-step learning-rate schedule (torch.optim schedulers)."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR, StepLR

from utils.errors import UserError
from utils.train.settings import LR_DECAYS, OPTIMIZERS

NOMINAL_BATCH = 64  # the original scales learning rates by batch_size / 64


def lr_bounds(optimizer_type: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """The original's (floor, ceiling) of the scaled Init_lr and of the scaled Min_lr (a hundredth of those)."""
    low, high = (3e-5, 1e-4) if optimizer_type in ("adam", "adamw") else (5e-4, 5e-2)
    return (low, high), (low * 1e-2, high * 1e-2)


def scaled_lrs(init_lr: float, min_lr: float, batch_size: int, optimizer_type: str) -> tuple[float, float]:
    """The original's batch-size scaling of the learning rate, clamped to its per-optimiser limits."""
    return tuple(min(max(batch_size / NOMINAL_BATCH * rate, low), high)
                 for rate, (low, high) in zip((init_lr, min_lr), lr_bounds(optimizer_type)))


def _short(rate: float) -> str:
    """3e-4, not 0.0003 or 3.000e-04."""
    mantissa, exponent = f"{rate:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def scaling_note(wanted: tuple[float, float], scaled: tuple[float, float], batch_size: int,
                 optimizer_type: str) -> str | None:
    """What the batch-size scaling did to the rates the user set, and which bound acted, or None when it left
    them as they were: `Init_lr 1e-4 -> 3e-5 (x 8/64 = 1.25e-5, raised to adamw's floor 3e-5)`."""
    changes = []
    for name, a, b, (low, high) in zip(("Init_lr", "Min_lr"), wanted, scaled, lr_bounds(optimizer_type)):
        if math.isclose(a, b, rel_tol=1e-9):
            continue
        product = batch_size / NOMINAL_BATCH * a
        how = f"x {batch_size}/{NOMINAL_BATCH}"
        if math.isclose(b, low, rel_tol=1e-9) and product < low:
            how += f" = {_short(product)}, raised to {optimizer_type}'s floor {_short(low)}"
        elif math.isclose(b, high, rel_tol=1e-9) and product > high:
            how += f" = {_short(product)}, capped at {optimizer_type}'s ceiling {_short(high)}"
        changes.append(f"{name} {_short(a)} -> {_short(b)} ({how})")
    if not changes:
        return None
    return f"{', '.join(changes)} by the original's batch-size scaling; --scale_lr false keeps yours"


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Gains, biases, embeddings and the temperature are not weights that decay should pull to zero.
    # `embedding` covers OpenAI's token/positional/class embeddings and BERT's `embeddings.*_embeddings`;
    # biases, LayerNorm gains and logit_scale have fewer than two dimensions.
    return param.ndim < 2 or "embedding" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optimizer_type: str, lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    # One fused kernel per step instead of ~10 passes over every tensor: the 49408-row token
    # embedding alone made the unfused update cost as much as a tiny model's forward pass on a CPU.
    fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) and p.device.type in ("cpu", "cuda")
                for g in groups for p in g["params"])
    if optimizer_type == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.98), eps=1e-6, fused=fused)
    if optimizer_type == "adam":
        # Adam's weight decay is L2 in the gradient; the original passes it the same way.
        return torch.optim.Adam(groups, lr=lr, betas=(momentum, 0.98), eps=1e-6, fused=fused)
    if optimizer_type == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    raise UserError(f"optimizer_type {optimizer_type!r} is not one of {', '.join(OPTIMIZERS)}")


def build_scheduler(optimizer: torch.optim.Optimizer, lr_decay_type: str, total_steps: int, warmup_steps: int,
                    lr: float, min_lr: float) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup from lr/100, then cosine to min_lr or ten equal steps down to min_lr."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup_steps, 1)
    if lr_decay_type == "cos":
        decay = CosineAnnealingLR(optimizer, T_max=decay_steps, eta_min=min_lr)
    elif lr_decay_type == "step":
        stages = 10
        decay = StepLR(optimizer, step_size=max(math.ceil(decay_steps / stages), 1),
                       gamma=(min_lr / lr) ** (1 / (stages - 1)) if lr > 0 and min_lr > 0 else 0.1)
    else:
        raise UserError(f"lr_decay_type {lr_decay_type!r} is not one of {', '.join(LR_DECAYS)}")
    if warmup_steps == 0:
        return decay
    warmup = LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, decay], milestones=[warmup_steps])
