"""One epoch of training (its steps, with gradient accumulation, non-finite losses and stop requests) and the
validation loss."""
from __future__ import annotations

import math
import signal

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from utils.callbacks import LossHistory
from utils.device import PRECISIONS, autocast
from utils.errors import UserError
from utils.finetune.accum import CachedBatch
from utils.finetune.partial import batch_norm_stats_frozen, freeze_batch_norm_stats, tower_trains
from utils.train.caption_loss import batch_losses
from utils.train.distributed import DistInfo, all_true, mean_across

MAX_LOGIT_SCALE = math.log(100)


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop finishes its step, saves a resumable state and stops."""

    def __init__(self):
        self.signum = 0

    def __call__(self, signum, frame) -> None:
        self.signum = signum

    def install(self) -> None:
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)


def _unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def stop_requested(stop: StopFlag, state: dict, cfg: dict, info: DistInfo, device) -> bool:
    """A signal arrived or this invocation's `stop_after_steps` is spent, on any rank."""
    budget = cfg["stop_after_steps"]
    spent = bool(budget) and state["global_step"] - state["run_start_step"] >= budget
    return not all_true(not (stop.signum or spent), info, device)


def fit_one_epoch(model, criterion, optimizer, scheduler, scaler, loader, epoch: int, start_step: int,
                  state: dict, cfg: dict, device, precision: str, info: DistInfo, stop: StopFlag,
                  history: LossHistory | None) -> bool:
    """Train one epoch from `start_step`; returns False when a stop was requested mid-epoch."""
    model.train()
    for tower in (_unwrap(model).visual, _unwrap(model).text):
        tower.train(tower_trains(tower))  # a frozen tower also keeps its dropout off
    freeze_batch_norm_stats(_unwrap(model), batch_norm_stats_frozen(cfg))
    total = len(loader) + start_step
    accum_freq = cfg.get("accum_freq", 1)
    bar = tqdm(loader, total=total, initial=start_step, desc=f"Epoch {epoch}/{cfg['Epoch']}", disable=not info.is_main,
               dynamic_ncols=True)
    for step, (pixels, tokens) in enumerate(bar, start=start_step):
        pixels, tokens = pixels.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
        if accum_freq > 1:
            batch = CachedBatch(model, criterion, pixels, tokens, accum_freq, device, PRECISIONS[precision])
            loss, parts = batch.loss, batch.parts
        else:
            with autocast(device, PRECISIONS[precision]):
                loss, parts = batch_losses(model, criterion, pixels, tokens)
        if not all_true(bool(torch.isfinite(loss)), info, device):
            state["bad_steps"] += 1
            state["bad_in_a_row"] += 1
            optimizer.zero_grad(set_to_none=True)
            if state["bad_in_a_row"] >= cfg["max_bad_steps"]:
                raise UserError(f"the loss was not finite for {state['bad_in_a_row']} steps in a row (epoch {epoch}, "
                                f"step {step}); stopping without saving these weights. Lower Init_lr, try "
                                "precision='fp32' or grad_clip, and check the data. Earlier checkpoints are intact.")
        else:
            state["bad_in_a_row"] = 0
            if accum_freq > 1:
                batch.backward(lambda micro_loss: scaler.scale(micro_loss).backward())
            else:
                scaler.scale(loss).backward()
            if cfg["grad_clip"] > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                _unwrap(model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        scheduler.step()
        state["global_step"] += 1
        state["step"] = step + 1
        shown = float(mean_across(loss.detach().float(), info))
        terms = {name: float(mean_across(term.detach().float(), info)) for name, term in parts.items()}
        lr = optimizer.param_groups[0]["lr"]
        if info.is_main:
            state["epoch_loss_sum"] += shown if math.isfinite(shown) else 0.0
            state["epoch_loss_count"] += int(math.isfinite(shown))
            sums = state.setdefault("epoch_term_sums", {})
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + (value if math.isfinite(shown) else 0.0)
            bar.set_postfix(loss=f"{state['epoch_loss_sum'] / max(state['epoch_loss_count'], 1):.3f}", lr=f"{lr:.2e}")
            if history is not None:
                history.log_step(state["global_step"], epoch, loss=shown, lr=lr, **terms)
        if step + 1 < total and stop_requested(stop, state, cfg, info, device):
            return False
    bar.close()
    return True


@torch.no_grad()
def validation_loss(model, criterion, loader, device, precision: str, info: DistInfo) -> float:
    model.eval()
    losses = []
    for pixels, tokens in loader:
        with autocast(device, PRECISIONS[precision]):
            losses.append(batch_losses(model, criterion, pixels.to(device), tokens.to(device))[0].float())
    mean = torch.stack(losses).mean() if losses else torch.tensor(float("nan"), device=device)
    return float(mean_across(mean, info))
