"""WiSE-FT (Wortsman et al., 2022): blend the weights before and after fine-tuning,
theta = (1 - alpha) * theta_start + alpha * theta_finetuned.

`interpolate` is the blend (train.py's `wise_ft_alpha`); the sweep over alpha is an evaluation (utils/eval/wise_ft.py).
"""
from __future__ import annotations

from typing import Mapping

import torch

from utils.errors import UserError


def check_alpha(alpha, setting_name: str) -> float:
    """`alpha` as a float, or a UserError naming `setting_name` when it is not a number from 0 to 1."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise UserError(f"{setting_name} must be a number from 0 (the weights before fine-tuning) to 1 (the "
                        f"fine-tuned weights), got {alpha!r}")
    return float(alpha)


def check_alphas(alphas, setting_name: str) -> list[float]:
    """The distinct alphas of a non-empty list, ascending; a UserError for an empty list or any value outside [0, 1]."""
    if not isinstance(alphas, (list, tuple)) or not alphas:
        raise UserError(f"{setting_name} needs at least one alpha from 0 to 1, e.g. --{setting_name} 0 0.5 1")
    bad = [a for a in alphas if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1]
    if bad:
        raise UserError(f"{setting_name} values must be numbers from 0 (the weights before fine-tuning) to 1 (the "
                        f"fine-tuned weights), got {bad[0]!r}")
    return sorted({float(a) for a in alphas})


def check_pair(start: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
               names: tuple[str, str] = ("start", "finetuned")) -> None:
    """A UserError in one line unless both state dicts hold the same tensors (keys, shapes, float or not) and
    every non-float tensor (a buffer such as position ids) is equal in both, as a blend needs."""
    problems = []
    for title, keys in ((f"only in {names[0]}", [k for k in start if k not in finetuned]),
                        (f"only in {names[1]}", [k for k in finetuned if k not in start])):
        if keys:
            problems.append(f"{len(keys)} keys {title} (first: {', '.join(keys[:3])})")
    shared = [k for k in finetuned if k in start]
    shapes = [f"{k} {tuple(start[k].shape)} vs {tuple(finetuned[k].shape)}" for k in shared
              if start[k].shape != finetuned[k].shape]
    if shapes:
        problems.append(f"{len(shapes)} shapes differ (first: {'; '.join(shapes[:3])})")
    kinds = [k for k in shared if start[k].is_floating_point() != finetuned[k].is_floating_point()]
    if kinds:
        problems.append(f"{len(kinds)} tensors are floating point in one file only (first: {', '.join(kinds[:3])})")
    # BatchNorm's batch counter moves whenever its statistics do; it weighs nothing (momentum is set), so the
    # fine-tuned count is kept.
    fixed = [k for k in shared if k not in kinds and not finetuned[k].is_floating_point()
             and start[k].shape == finetuned[k].shape and not k.endswith("num_batches_tracked")
             and not torch.equal(start[k].cpu(), finetuned[k].cpu())]
    if fixed:
        problems.append(f"{len(fixed)} integer tensors differ (first: {', '.join(fixed[:3])})")
    if problems:
        raise UserError(f"{names[0]} and {names[1]} are not one architecture before and after fine-tuning: "
                        + "; ".join(problems))


def _blend(start: torch.Tensor, finetuned: torch.Tensor, alpha: float) -> torch.Tensor:
    # The endpoints are copies, not arithmetic: 1 * x + 0 * y turns -0.0 into 0.0 and inf into nan.
    if alpha == 0:
        return start.to(finetuned.device, finetuned.dtype, copy=True)
    if alpha == 1:
        return finetuned.clone()
    # fp16/bf16 weights are blended in fp32 (fp64 stays fp64), then stored in the fine-tuned file's dtype.
    work = torch.promote_types(finetuned.dtype, torch.float32)
    mixed = start.to(finetuned.device, work).mul(1 - alpha).add_(finetuned.to(work), alpha=alpha)
    return mixed.to(finetuned.dtype)


def interpolate(start: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], alpha: float,
                names: tuple[str, str] = ("start", "finetuned")) -> dict[str, torch.Tensor]:
    """(1 - alpha) * start + alpha * finetuned for every floating tensor (keys in the fine-tuned order, on its
    device and in its dtype); non-float tensors must be equal in both and are copied. `names` name the two
    state dicts (their files) in the error raised when they do not match."""
    alpha = check_alpha(alpha, "alpha")
    check_pair(start, finetuned, names)
    return {k: _blend(start[k].detach(), v.detach(), alpha) if v.is_floating_point() else v.detach().clone()
            for k, v in finetuned.items()}
