"""The training run behind train.py: setup, the epoch loop, checkpoints, resume and interruption."""
from __future__ import annotations

import math
import signal
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from nets import CLIPConfig, build_model

from .augment import CaptionAugment, augment_level
from .callbacks import EvalCallback, LossHistory
from .checkpoint import atomic_save, load_state, newest_state, prune_states, state_path
from .dataloader import CaptionDataset, EpochSampler
from .device import PRECISIONS, autocast, loader_workers, resolve_device
from .distributed import DistInfo, all_true, cleanup, init_distributed, mean_across
from .errors import UserError
from .finetune.accum import CachedBatch, check_accum
from .finetune.lora import add_lora, plain_state_dict, save_adapter
from .finetune.partial import apply_locks, parameter_summary, tower_trains
from .images import eval_transform
from .loss import ClipLoss
from .optim import build_optimizer, build_scheduler, check_schedule_choices, scaled_lrs, scaling_note
from .preflight import preflight
from .savedir import hold_save_dir, resume_differences, unused_log_dir, warn_if_short_of_space
from .sources.stream import ShardStream, is_shard_source
from .tokenizer import build_tokenizer
from .weights import init_model

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


def _ignore_sigint(_worker_id: int) -> None:
    # A terminal's Ctrl-C reaches every process in the group; only the main process should act on it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def resolve_training_precision(cfg: dict, device: torch.device) -> str:
    precision = cfg["precision"] or ("fp16" if cfg["fp16"] else "fp32")
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise UserError("precision='fp16' (or fp16=True) trains with CUDA AMP, and no CUDA device is in use; "
                        "use precision='bf16' or 'fp32' on the CPU")
    return precision


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
    total = len(loader) + start_step
    accum_freq = cfg.get("accum_freq", 1)
    bar = tqdm(loader, total=total, initial=start_step, desc=f"Epoch {epoch}/{cfg['Epoch']}", disable=not info.is_main,
               dynamic_ncols=True)
    for step, (pixels, tokens) in enumerate(bar, start=start_step):
        pixels, tokens = pixels.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
        if accum_freq > 1:
            batch = CachedBatch(model, criterion, pixels, tokens, accum_freq, device, PRECISIONS[precision])
            loss = batch.loss
        else:
            with autocast(device, PRECISIONS[precision]):
                image_features, text_features, scale = model(pixels, tokens)
                loss = criterion(image_features, text_features, scale)
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
        lr = optimizer.param_groups[0]["lr"]
        if info.is_main:
            state["epoch_loss_sum"] += shown if math.isfinite(shown) else 0.0
            state["epoch_loss_count"] += int(math.isfinite(shown))
            bar.set_postfix(loss=f"{state['epoch_loss_sum'] / max(state['epoch_loss_count'], 1):.3f}", lr=f"{lr:.2e}")
            if history is not None:
                history.log_step(state["global_step"], epoch, loss=shown, lr=lr)
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
            losses.append(criterion(*model(pixels.to(device), tokens.to(device))).float())
    mean = torch.stack(losses).mean() if losses else torch.tensor(float("nan"), device=device)
    return float(mean_across(mean, info))


def _loader(dataset, sampler, batch_size: int, cfg: dict, device) -> DataLoader:
    workers = cfg["num_workers"]
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      worker_init_fn=_ignore_sigint if workers > 0 else None)


def _check_batch(name: str, n: int, global_batch: int, info: DistInfo, json_path: str) -> None:
    if global_batch % info.world_size:
        raise UserError(f"batch_size {global_batch} must be divisible by the {info.world_size} processes")
    if n < global_batch:
        raise UserError(f"batch_size {global_batch} is larger than the {n} {name} samples in {json_path}; "
                        f"lower batch_size to at most {n} (contrastive batches need that many distinct pairs)")


def run_training(cfg: dict, explicit: dict | None = None) -> dict:
    """Everything train.py does. Returns a summary: last metrics, checkpoint paths, and whether it was interrupted.
    `explicit`: the settings the command line gave (a resume compares them with the state's run)."""
    cfg = {**cfg, "num_workers": loader_workers(cfg["num_workers"])}
    device = resolve_device(cfg["Cuda"])
    info = init_distributed(cfg["distributed"], device.type == "cuda")
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    try:
        # Mistakes in the settings leave no trace, not even an empty save_dir.
        precision, augment = _check_settings(cfg, device, info)
        with hold_save_dir(cfg["save_dir"], info, device):  # one run per save_dir, before any work
            return _train(cfg, device, info, explicit or {}, precision, augment)
    finally:
        cleanup(info)


def _check_settings(cfg: dict, device: torch.device, info: DistInfo) -> tuple[str, str]:
    """Settings checked before any file is read or written; returns the precision and the augmentation level."""
    precision = resolve_training_precision(cfg, device)
    check_schedule_choices(cfg["optimizer_type"], cfg["lr_decay_type"])
    if cfg["Init_Epoch"] >= cfg["Epoch"]:
        raise UserError(f"Init_Epoch {cfg['Init_Epoch']} leaves no epoch to train: it must be below Epoch "
                        f"{cfg['Epoch']}")
    check_accum(cfg["accum_freq"], cfg["batch_size"] // info.world_size, info.world_size)
    return precision, augment_level(cfg["augment"], cfg["datasets_random"])


def _train(cfg: dict, device: torch.device, info: DistInfo, explicit: dict, precision: str, augment: str) -> dict:
    cfg = {**cfg, "processes": info.world_size}  # saved with the state: a resume compares it
    save_dir = Path(cfg["save_dir"])  # writable and ours: run_training holds its lock
    resume_path = newest_state(save_dir) if cfg["resume"] == "auto" else (Path(cfg["resume"]) if cfg["resume"] else None)
    if cfg["resume"] == "auto" and resume_path is None and info.is_main:
        print(f"resume='auto': no training state in {save_dir}, starting fresh")
    resumed = load_state(resume_path) if resume_path else None
    if resumed:  # on every rank: a refusal must stop them all
        differences = resume_differences(cfg, explicit, resumed["config"], resume_path)
        if info.is_main and differences:
            print("\n".join(differences))

    torch.manual_seed(cfg["seed"])
    # Adapters are part of the architecture: a resumed state brings back the ones it was trained with.
    tuning = {**cfg, "lora_r": 0, **{k: v for k, v in resumed["config"]["train"].items() if k.startswith("lora_")}} \
        if resumed else cfg
    if resumed:
        model = build_model(CLIPConfig.from_dict(resumed["config"]["clip"]))
        phi, sources = resumed["config"]["phi"], [f"all weights: resumed from {resume_path}"]
    else:
        model, phi, sources = init_model(cfg["phi"], cfg["model_path"], cfg["bert_path"])
    config = model.config
    apply_locks(model, cfg)
    if tuning.get("lora_r", 0) > 0:
        add_lora(model, tuning)
    if resumed:
        model.load_state_dict(resumed["model"])
    model.set_grad_checkpointing(cfg["grad_checkpointing"])
    model.to(device)

    tokenizer = build_tokenizer("bert" if config.text.is_bert else "openai", config.text.context_length,
                                cfg["bert_vocab_path"] if config.text.is_bert else None)
    root = Path(cfg["datasets_path"])
    columns = (cfg["csv_image_column"], cfg["csv_caption_column"])
    val_entries = preflight(cfg["datasets_val_json_path"], root, cfg["num_workers"], cfg["skip_bad_samples"],
                            quiet=not info.is_main, columns=columns)
    local_batch = cfg["batch_size"] // info.world_size
    size = config.vision.image_size
    train_augment = CaptionAugment(size, augment, cfg["letterbox_image"])
    if is_shard_source(cfg["datasets_train_json_path"]):
        # The stream is its own sampler: set_epoch(epoch, start_batch) and batches_per_epoch().
        train_sampler = ShardStream(cfg["datasets_train_json_path"], train_augment, tokenizer, local_batch,
                                    cfg["seed"], info.rank, info.world_size, cfg["num_workers"],
                                    cfg["train_samples_per_epoch"])
        n_train = train_sampler.total_samples()
        _check_batch("training", n_train, cfg["batch_size"], info, cfg["datasets_train_json_path"])
        # Not persistent: each epoch's workers must see the stream's new epoch.
        train_loader = DataLoader(train_sampler, batch_size=None, num_workers=cfg["num_workers"],
                                  pin_memory=device.type == "cuda",
                                  worker_init_fn=_ignore_sigint if cfg["num_workers"] > 0 else None)
    else:
        train_entries = preflight(cfg["datasets_train_json_path"], root, cfg["num_workers"], cfg["skip_bad_samples"],
                                  quiet=not info.is_main, columns=columns)
        n_train = len(train_entries)
        _check_batch("training", n_train, cfg["batch_size"], info, cfg["datasets_train_json_path"])
        train_set = CaptionDataset(train_entries, root, train_augment, tokenizer, seed=cfg["seed"])
        train_sampler = EpochSampler(train_set, local_batch, info.world_size, info.rank, seed=cfg["seed"])
        train_loader = _loader(train_set, train_sampler, local_batch, cfg, device)
    val_set = CaptionDataset(val_entries, root, CaptionAugment(size, "none", cfg["letterbox_image"]), tokenizer,
                             seed=cfg["seed"])
    val_batch = min(cfg["batch_size"], len(val_entries)) // info.world_size
    val_sampler = EpochSampler(val_set, max(val_batch, 1), info.world_size, info.rank, seed=cfg["seed"], shuffle=False)
    val_loader = _loader(val_set, val_sampler, max(val_batch, 1), cfg, device)

    steps_per_epoch = train_sampler.batches_per_epoch()
    total_steps = steps_per_epoch * (cfg["Epoch"] - cfg["Init_Epoch"])
    init_lr, min_lr = (scaled_lrs(cfg["Init_lr"], cfg["Min_lr"], cfg["batch_size"], cfg["optimizer_type"])
                       if cfg["scale_lr"] else (cfg["Init_lr"], cfg["Min_lr"]))
    optimizer = build_optimizer(model, cfg["optimizer_type"], init_lr, cfg["momentum"], cfg["weight_decay"])
    scheduler = build_scheduler(optimizer, cfg["lr_decay_type"], total_steps,
                                round(cfg["warmup_ratio"] * total_steps), init_lr, min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.enabled else model
    criterion = ClipLoss(info)

    state = {"epoch": cfg["Init_Epoch"], "step": 0, "global_step": 0, "bad_steps": 0, "bad_in_a_row": 0,
             "best_val_loss": float("inf"), "log_dir": str(unused_log_dir(save_dir))}
    if resumed:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        torch.set_rng_state(resumed["rng"]["cpu"])
        if device.type == "cuda" and "cuda" in resumed["rng"]:
            torch.cuda.set_rng_state(resumed["rng"]["cuda"], device)
        state.update({k: resumed[k] for k in ("epoch", "step", "global_step", "bad_steps", "best_val_loss", "log_dir")})
        if state["step"] >= steps_per_epoch:
            state["epoch"], state["step"] = state["epoch"] + 1, 0
    state["run_start_step"] = state["global_step"]
    if info.is_main:  # before the log folder's first write
        warn_if_short_of_space(save_dir, model, cfg["optimizer_type"])

    history = LossHistory(state["log_dir"]) if info.is_main else None
    evaluator = EvalCallback(val_entries, root, eval_transform(size, cfg["letterbox_image"]), tokenizer,
                             cfg["batch_size"], cfg["num_workers"], device, PRECISIONS[precision],
                             cfg["eval_period"], cfg["eval_flag"])
    if info.is_main:
        save_dir.mkdir(parents=True, exist_ok=True)
        print(f"phi={phi}  device={device}  precision={precision}  processes={info.world_size}")
        print(parameter_summary(model) + (f", LoRA r={tuning['lora_r']} on {'+'.join(tuning['lora_targets'])}"
                                          if tuning.get("lora_r", 0) > 0 else ""))
        if cfg["accum_freq"] > 1:
            print(f"batch {cfg['batch_size']} per step as {cfg['accum_freq']} micro-batches of "
                  f"{local_batch // cfg['accum_freq']} per process, every negative kept")
        for line in sources:
            print(line)
        if cfg["scale_lr"] and (note := scaling_note((cfg["Init_lr"], cfg["Min_lr"]), (init_lr, min_lr),
                                                      cfg["batch_size"], cfg["optimizer_type"])):
            print(note)
        print(f"{n_train} train / {len(val_entries)} val images, {steps_per_epoch} steps per epoch, "
              f"lr {init_lr:.2e} -> {min_lr:.2e} ({cfg['lr_decay_type']})")
        if resumed:
            print(f"resumed from {resume_path} at epoch {state['epoch'] + 1}, step {state['step']}")

    stop = StopFlag()
    stop.install()

    def save_state() -> Path:
        path = state_path(save_dir, state["global_step"])
        rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
                     **{k: state[k] for k in ("epoch", "step", "global_step", "bad_steps", "best_val_loss", "log_dir")},
                     "config": {"clip": config.to_dict(), "phi": phi, "train": dict(cfg)}}, path)
        prune_states(save_dir, cfg["keep_states"])
        return path

    summary = {"interrupted": 0, "phi": phi, "metrics": {}, "save_dir": str(save_dir), "log_dir": state["log_dir"]}

    def interrupted(path: Path | None) -> dict:
        summary.update(interrupted=stop.signum or -1, state=str(path))
        if info.is_main:
            why = signal.Signals(stop.signum).name if stop.signum else f"stop_after_steps={cfg['stop_after_steps']}"
            print(f"\nstopped ({why}) at epoch {state['epoch'] + 1}, step {state['step']}; full state saved to {path}\n"
                  f"resume with the same command plus: --resume {path}   (or --resume auto)")
        if history is not None:
            history.close()
        return summary

    for epoch in range(state["epoch"], cfg["Epoch"]):
        state["epoch"] = epoch
        state["epoch_loss_sum"], state["epoch_loss_count"] = 0.0, 0
        train_sampler.set_epoch(epoch, state["step"])
        finished = fit_one_epoch(ddp_model, criterion, optimizer, scheduler, scaler, train_loader, epoch + 1,
                                 state["step"], state, cfg, device, precision, info, stop, history)
        if not finished:
            return interrupted(save_state() if info.is_main else None)
        state["step"] = 0
        val_loss = validation_loss(ddp_model, criterion, val_loader, device, precision, info)
        train_loss = state["epoch_loss_sum"] / max(state["epoch_loss_count"], 1)
        if info.is_main:
            record = {"epoch": epoch + 1, "loss": train_loss, "val_loss": val_loss,
                      "lr": optimizer.param_groups[0]["lr"], "bad_steps": state["bad_steps"]}
            print(f"Epoch {epoch + 1}/{cfg['Epoch']}")
            print(f"Total Loss: {train_loss:.3f} || Val Loss: {val_loss:.3f} ")
            if evaluator.due(epoch + 1, cfg["Epoch"]):
                metrics = evaluator(model)
                summary["metrics"] = metrics
                record.update(metrics)
                print("recall: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if "_r" in k or k == "r_mean"))
            history.append(record)
            weights = plain_state_dict(model)
            if (epoch + 1) % cfg["save_period"] == 0 or epoch + 1 == cfg["Epoch"]:
                atomic_save(weights, save_dir / f"ep{epoch + 1:03d}-loss{train_loss:.3f}-val_loss{val_loss:.3f}.pth")
            if val_loss <= state["best_val_loss"]:
                state["best_val_loss"] = val_loss
                atomic_save(weights, save_dir / "best_epoch_weights.pth")
            atomic_save(weights, save_dir / "last_epoch_weights.pth")
            if tuning.get("lora_r", 0) > 0:
                save_adapter(model, save_dir / "last_epoch_lora")
            state["step"] = steps_per_epoch
            summary["state"] = str(save_state())
            state["step"] = 0
        if info.enabled:
            torch.distributed.barrier()
        if epoch + 1 < cfg["Epoch"] and stop_requested(stop, state, cfg, info, device):
            return interrupted(Path(summary["state"]) if info.is_main else None)
    if history is not None:
        history.close()
    if cfg["wise_ft_alpha"] is not None and info.is_main:
        summary["wise_ft"] = str(_save_wise_ft(cfg, phi, plain_state_dict(model), save_dir))
    summary["bad_steps"] = state["bad_steps"]
    return summary


def _save_wise_ft(cfg: dict, phi: str, finetuned: dict, save_dir: Path) -> Path:
    """The WiSE-FT blend of the final weights with the starting ones, rebuilt as the run began them."""
    from .finetune.wise_ft import interpolate

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        start, _, _ = init_model(phi, cfg["model_path"], cfg["bert_path"])
    alpha = cfg["wise_ft_alpha"]
    path = save_dir / f"wise_ft_alpha{alpha:g}_weights.pth"
    atomic_save(interpolate(start.state_dict(), finetuned, alpha, (cfg["model_path"] or "random init",
                                                                    "the final weights")), path)
    print(f"WiSE-FT: (1 - {alpha:g}) x starting weights + {alpha:g} x final weights saved to {path}")
    return path
