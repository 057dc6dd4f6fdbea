"""The training run behind train.py: setup, the epoch loop, checkpoints, resume and interruption."""
from __future__ import annotations

import signal
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from nets import CLIPConfig, build_model

from utils.callbacks import EvalCallback, LossHistory
from utils.data.augment import CaptionAugment, augment_level
from utils.data.images import eval_transform
from utils.data.preflight import input_report, preflight
from utils.data.preprocess import Preprocess
from utils.data.sources.shards import is_shard_source
from utils.data.sources.stream import ShardStream
from utils.dataloader import CaptionDataset, EpochSampler
from utils.device import PRECISIONS, loader_workers, resolve_device
from utils.errors import UserError
from utils.files import atomic_save
from utils.finetune.accum import check_accum
from utils.finetune.lora import add_lora, plain_state_dict, save_adapter
from utils.finetune.partial import apply_locks, batch_norm_stats_frozen, parameter_summary
from utils.metrics import small_val_warning
from utils.tokenizer import copy_tokenizer_files, files_beside, reads_files_beside, text_tokenizer
from utils.train.caption_loss import CAPTION_LOSS_WEIGHT, CONTRASTIVE_LOSS_WEIGHT, CoCaLoss
from utils.train.checkpoint import load_state, newest_state, prune_states, state_path
from utils.train.distributed import DistInfo, cleanup, init_distributed
from utils.train.epoch import StopFlag, fit_one_epoch, stop_requested, validation_loss
from utils.train.loss import add_logit_bias, build_loss, loss_name
from utils.train.optim import build_optimizer, build_scheduler, scaled_lrs, scaling_note
from utils.train.savedir import hold_save_dir, resume_differences, unused_log_dir, warn_if_short_of_space
from utils.train.settings import check_data_paths, check_schedule
from utils.weights.arch import save_weights
from utils.weights.load import init_model, preprocess_of, recorded_language
from utils.weights.pretrained import locate

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
    check_schedule(cfg)
    check_accum(cfg["accum_freq"], cfg["batch_size"] // info.world_size, info.world_size)
    check_data_paths(cfg)
    return precision, augment_level(cfg["augment"], cfg["datasets_random"])


def _train(cfg: dict, device: torch.device, info: DistInfo, explicit: dict, precision: str, augment: str) -> dict:
    run = _Run(cfg, device, info, precision)
    run.resume(explicit)
    run.build_model()
    run.build_data(augment)
    run.build_optimisation()
    run.restore_progress()
    run.announce()
    return run.loop()


class _Run:
    """One training run, in the order a reader would name its parts: the state to resume, the model, the data,
    the optimiser and schedule, the progress restored from the state, what is printed, the epoch loop, the end.
    The order of the parts is the order of the random draws, so it is part of exact resumption."""

    def __init__(self, cfg: dict, device: torch.device, info: DistInfo, precision: str):
        self.cfg = {**cfg, "processes": info.world_size}  # saved with the state: a resume compares it
        self.device, self.info, self.precision = device, info, precision
        self.save_dir = Path(cfg["save_dir"])  # writable and ours: run_training holds its lock

    def resume(self, explicit: dict) -> None:
        cfg, info = self.cfg, self.info
        self.resume_path = newest_state(self.save_dir) if cfg["resume"] == "auto" else \
            (Path(cfg["resume"]) if cfg["resume"] else None)
        if cfg["resume"] == "auto" and self.resume_path is None and info.is_main:
            print(f"resume='auto': no training state in {self.save_dir}, starting fresh")
        self.resumed = load_state(self.resume_path) if self.resume_path else None
        if self.resumed:  # on every rank: a refusal must stop them all
            differences = resume_differences(cfg, explicit, self.resumed["config"], self.resume_path)
            if info.is_main and differences:
                print("\n".join(differences))

    def build_model(self) -> None:
        cfg, resumed = self.cfg, self.resumed
        torch.manual_seed(cfg["seed"])
        # Adapters are part of the architecture: a resumed state brings back the ones it was trained with.
        self.tuning = {**cfg, "lora_r": 0, **{k: v for k, v in resumed["config"]["train"].items()
                                               if k.startswith("lora_")}} if resumed else cfg
        if resumed:
            model = build_model(CLIPConfig.from_dict(resumed["config"]["clip"]))
            if "preprocess" in resumed["config"]:  # the record of the weights the run started from
                model.preprocess = Preprocess.from_dict(resumed["config"]["preprocess"], str(self.resume_path))
            # The language the run went on in (a state saved before it was kept: the run's setting).
            model.text_language = (resumed["config"].get("text_language")
                                   or resumed["config"]["train"].get("text_language") or None)
            self.phi, self.sources = resumed["config"]["phi"], [f"all weights: resumed from {self.resume_path}"]
        else:
            model, self.phi, self.sources = init_model(cfg["phi"], cfg["model_path"], cfg["bert_path"])
        self.loss = loss_name(cfg.get("loss", ""), model)
        if self.loss == "sigmoid" and model.logit_bias is None:
            if resumed:  # its state has no logit_bias to load
                raise UserError(f"loss='sigmoid': the training state {self.resume_path} was trained with the softmax "
                                "loss and has no logit_bias; resume it with --loss softmax, or start a new run")
            add_logit_bias(model)  # before the locks and adapters, which leave it training
            self.sources.append("logit_bias: new, with logit_scale, at the sigmoid loss's start (scale 10, bias -10)")
        apply_locks(model, cfg)
        if self.tuning.get("lora_r", 0) > 0:
            add_lora(model, self.tuning)
        if resumed:
            model.load_state_dict(resumed["model"])
        model.set_grad_checkpointing(cfg["grad_checkpointing"])
        self.model = model.to(self.device)
        self.config = model.config
        self.preprocess = preprocess_of(model)  # kept in the training states and beside every weight file
        # Also kept there: the captions' language, this run's, else the one the weights were trained with.
        self.text_language = self.cfg["text_language"] or recorded_language(model)
        if self.text_language and not self.cfg["text_language"]:
            self.sources.append(f"text_language {self.text_language}: recorded with the weights")

    def _tokenizer_folder(self) -> Path | None:
        """Where the tokenizer files are (SigLIP's, CLIPA's): beside the weights it starts from (a name's download), else beside
        the weights this run saved (a resume that names none)."""
        if self.cfg["model_path"]:
            return files_beside(locate(self.cfg["model_path"], self.cfg["phi"]).path)
        return self.save_dir if self.resumed else None

    def build_data(self, augment: str) -> None:
        cfg, info, device, config = self.cfg, self.info, self.device, self.config
        self.tokenizer_folder = self._tokenizer_folder() if reads_files_beside(config.text) else None
        self.tokenizer = text_tokenizer(config.text, self.tokenizer_folder, cfg["bert_vocab_path"], self.text_language)
        self.root = root = Path(cfg["datasets_path"])
        columns = (cfg["csv_image_column"], cfg["csv_caption_column"])
        self.val_entries = preflight(cfg["datasets_val_json_path"], root, cfg["num_workers"], cfg["skip_bad_samples"],
                                     quiet=not info.is_main, columns=columns)
        self.local_batch = cfg["batch_size"] // info.world_size
        size = config.vision.image_size
        train_augment = CaptionAugment(size, augment, cfg["letterbox_image"], self.preprocess)
        val_augment = CaptionAugment(size, "none", cfg["letterbox_image"], self.preprocess)
        if is_shard_source(cfg["datasets_train_json_path"]):
            # The stream is its own sampler: set_epoch(epoch, start_batch) and batches_per_epoch().
            self.train_sampler = ShardStream(cfg["datasets_train_json_path"], train_augment, self.tokenizer,
                                             self.local_batch, cfg["seed"], info.rank, info.world_size,
                                             cfg["num_workers"], cfg["train_samples_per_epoch"],
                                             fast_decode=cfg["fast_decode"])
            self.n_train = self.train_sampler.total_samples()
            _check_batch("training", self.n_train, cfg["batch_size"], info, cfg["datasets_train_json_path"])
            # Not persistent: each epoch's workers must see the stream's new epoch.
            self.train_loader = DataLoader(self.train_sampler, batch_size=None, num_workers=cfg["num_workers"],
                                           pin_memory=device.type == "cuda",
                                           worker_init_fn=_ignore_sigint if cfg["num_workers"] > 0 else None)
        else:
            train_entries = preflight(cfg["datasets_train_json_path"], root, cfg["num_workers"],
                                      cfg["skip_bad_samples"], quiet=not info.is_main, columns=columns)
            self.n_train = len(train_entries)
            if info.is_main:
                for line in input_report(train_entries, self.val_entries, self.tokenizer):
                    print(line)
            _check_batch("training", self.n_train, cfg["batch_size"], info, cfg["datasets_train_json_path"])
            train_set = CaptionDataset(train_entries, root, train_augment, self.tokenizer, seed=cfg["seed"],
                                       fast_decode=cfg["fast_decode"])
            self.train_sampler = EpochSampler(train_set, self.local_batch, info.world_size, info.rank,
                                              seed=cfg["seed"])
            self.train_loader = _loader(train_set, self.train_sampler, self.local_batch, cfg, device)
        val_set = CaptionDataset(self.val_entries, root, val_augment, self.tokenizer, seed=cfg["seed"],
                                 fast_decode=cfg["fast_decode"])
        val_batch = max(min(cfg["batch_size"], len(self.val_entries)) // info.world_size, 1)
        val_sampler = EpochSampler(val_set, val_batch, info.world_size, info.rank, seed=cfg["seed"], shuffle=False)
        self.val_loader = _loader(val_set, val_sampler, val_batch, cfg, device)

    def build_optimisation(self) -> None:
        cfg, device = self.cfg, self.device
        self.steps_per_epoch = self.train_sampler.batches_per_epoch()
        total_steps = self.steps_per_epoch * (cfg["Epoch"] - cfg["Init_Epoch"])
        self.init_lr, self.min_lr = (scaled_lrs(cfg["Init_lr"], cfg["Min_lr"], cfg["batch_size"], cfg["optimizer_type"])
                                     if cfg["scale_lr"] else (cfg["Init_lr"], cfg["Min_lr"]))
        self.optimizer = build_optimizer(self.model, cfg["optimizer_type"], self.init_lr, cfg["momentum"],
                                         cfg["weight_decay"])
        self.scheduler = build_scheduler(self.optimizer, cfg["lr_decay_type"], total_steps,
                                         round(cfg["warmup_ratio"] * total_steps), self.init_lr, self.min_lr)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.ddp_model = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None) \
            if self.info.enabled else self.model
        self.criterion = build_loss(self.loss, self.info)
        if self.model.writes_captions:  # a CoCa trains its caption decoder too, as open_clip trains it
            self.criterion = CoCaLoss(self.criterion, cfg.get("coca_caption_loss_weight", CAPTION_LOSS_WEIGHT),
                                      cfg.get("coca_contrastive_loss_weight", CONTRASTIVE_LOSS_WEIGHT), self.info)

    def restore_progress(self) -> None:
        resumed, device = self.resumed, self.device
        self.state = state = {"epoch": self.cfg["Init_Epoch"], "step": 0, "global_step": 0, "bad_steps": 0,
                              "bad_in_a_row": 0, "best_val_loss": float("inf"),
                              "log_dir": str(unused_log_dir(self.save_dir))}
        if resumed:
            self.optimizer.load_state_dict(resumed["optimizer"])
            self.scheduler.load_state_dict(resumed["scheduler"])
            self.scaler.load_state_dict(resumed["scaler"])
            torch.set_rng_state(resumed["rng"]["cpu"])
            if device.type == "cuda" and "cuda" in resumed["rng"]:
                torch.cuda.set_rng_state(resumed["rng"]["cuda"], device)
            state.update({k: resumed[k] for k in ("epoch", "step", "global_step", "bad_steps", "best_val_loss",
                                                  "log_dir")})
            if state["step"] >= self.steps_per_epoch:
                state["epoch"], state["step"] = state["epoch"] + 1, 0
        state["run_start_step"] = state["global_step"]
        if self.info.is_main:  # before the log folder's first write
            warn_if_short_of_space(self.save_dir, self.model, self.cfg["optimizer_type"])

    def announce(self) -> None:
        cfg, info, state = self.cfg, self.info, self.state
        self.history = LossHistory(state["log_dir"]) if info.is_main else None
        self.evaluator = EvalCallback(self.val_entries, self.root,
                                      eval_transform(self.config.vision.image_size, cfg["letterbox_image"],
                                                     self.preprocess),
                                      self.tokenizer, cfg["batch_size"], cfg["num_workers"], self.device,
                                      PRECISIONS[self.precision], cfg["eval_period"], cfg["eval_flag"],
                                      fast_decode=cfg["fast_decode"])
        if not info.is_main:
            return
        self.save_dir.mkdir(parents=True, exist_ok=True)
        # Every weight file goes to save_dir: with its tokenizer files beside it, each job loads it as it is.
        copy_tokenizer_files(self.tokenizer_folder, self.save_dir)
        print(f"phi={self.phi}  loss={self.loss}  device={self.device}  precision={self.precision}  "
              f"processes={info.world_size}")
        if isinstance(self.criterion, CoCaLoss):
            print(f"CoCa: loss = {self.criterion.contrastive_weight:g} x {self.loss} + "
                  f"{self.criterion.caption_weight:g} x caption cross-entropy (coca_contrastive_loss_weight, "
                  "coca_caption_loss_weight)")
        tuning = self.tuning
        print(parameter_summary(self.model) + (f", LoRA r={tuning['lora_r']} on {'+'.join(tuning['lora_targets'])}"
                                               if tuning.get("lora_r", 0) > 0 else ""))
        if cfg["accum_freq"] > 1:
            print(f"batch {cfg['batch_size']} per step as {cfg['accum_freq']} micro-batches of "
                  f"{self.local_batch // cfg['accum_freq']} per process, every negative kept")
        for line in self.sources:
            print(line)
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules()):
            frozen = batch_norm_stats_frozen(cfg)
            # Batch statistics are a micro-batch's and a process's own, not the global batch's.
            split = [] if frozen else [w for w, on in (("micro-batch", cfg["accum_freq"] > 1),
                                                       ("process", info.world_size > 1)) if on]
            print("BatchNorm statistics: " + ("frozen as loaded" if frozen else "updated by every batch")
                  + " (freeze_bn_stats)" + (f"; each {' and '.join(split)} normalises with its own, so a step is "
                                            "not exactly one whole batch's" if split else ""))
        if cfg["scale_lr"] and (note := scaling_note((cfg["Init_lr"], cfg["Min_lr"]), (self.init_lr, self.min_lr),
                                                      cfg["batch_size"], cfg["optimizer_type"])):
            print(note)
        print(f"{self.n_train} train / {len(self.val_entries)} val images, {self.steps_per_epoch} steps per epoch, "
              f"lr {self.init_lr:.2e} -> {self.min_lr:.2e} ({cfg['lr_decay_type']})")
        if warning := small_val_warning(len(self.val_entries), "Give datasets_val_json_path more images "
                                                               "(convert.py: --val_ratio) before choosing weights by it"):
            print(warning)
        if self.resumed:
            print(f"resumed from {self.resume_path} at epoch {state['epoch'] + 1}, step {state['step']}")

    def save_state(self) -> Path:
        state, device = self.state, self.device
        path = state_path(self.save_dir, state["global_step"])
        rng = {"cpu": torch.get_rng_state(),
               **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}
        atomic_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng,
                     **{k: state[k] for k in ("epoch", "step", "global_step", "bad_steps", "best_val_loss", "log_dir")},
                     "config": {"clip": self.config.to_dict(), "phi": self.phi, "train": dict(self.cfg),
                                "preprocess": self.preprocess.to_dict(), "text_language": self.text_language}}, path)
        prune_states(self.save_dir, self.cfg["keep_states"])
        return path

    def interrupted(self, path: Path | None) -> dict:
        self.summary.update(interrupted=self.stop.signum or -1, state=str(path))
        if self.info.is_main:
            why = signal.Signals(self.stop.signum).name if self.stop.signum else \
                f"stop_after_steps={self.cfg['stop_after_steps']}"
            print(f"\nstopped ({why}) at epoch {self.state['epoch'] + 1}, step {self.state['step']}; full state saved "
                  f"to {path}\nresume with the same command plus: --resume {path}   (or --resume auto)")
        if self.history is not None:
            self.history.close()
        return self.summary

    def loop(self) -> dict:
        cfg, info, state = self.cfg, self.info, self.state
        self.stop = StopFlag()
        self.stop.install()
        self.summary = {"interrupted": 0, "phi": self.phi, "metrics": {}, "save_dir": str(self.save_dir),
                        "log_dir": state["log_dir"]}
        for epoch in range(state["epoch"], cfg["Epoch"]):
            state["epoch"] = epoch
            state["epoch_loss_sum"], state["epoch_loss_count"], state["epoch_term_sums"] = 0.0, 0, {}
            self.train_sampler.set_epoch(epoch, state["step"])
            finished = fit_one_epoch(self.ddp_model, self.criterion, self.optimizer, self.scheduler, self.scaler,
                                     self.train_loader, epoch + 1, state["step"], state, cfg, self.device,
                                     self.precision, info, self.stop, self.history)
            if not finished:
                return self.interrupted(self.save_state() if info.is_main else None)
            state["step"] = 0
            val_loss = validation_loss(self.ddp_model, self.criterion, self.val_loader, self.device, self.precision,
                                       info)
            if info.is_main:
                self.end_epoch(epoch, val_loss)
            if info.enabled:
                torch.distributed.barrier()
            if epoch + 1 < cfg["Epoch"] and stop_requested(self.stop, state, cfg, info, self.device):
                return self.interrupted(Path(self.summary["state"]) if info.is_main else None)
        return self.finish()

    def end_epoch(self, epoch: int, val_loss: float) -> None:
        """Rank 0 after an epoch: print and record the losses (and recall when due), save weights and the state."""
        cfg, state, summary, save_dir = self.cfg, self.state, self.summary, self.save_dir
        train_loss = state["epoch_loss_sum"] / max(state["epoch_loss_count"], 1)
        record = {"epoch": epoch + 1, "loss": train_loss, "val_loss": val_loss,
                  "lr": self.optimizer.param_groups[0]["lr"], "bad_steps": state["bad_steps"]}
        print(f"Epoch {epoch + 1}/{cfg['Epoch']}")
        print(f"Total Loss: {train_loss:.3f} || Val Loss: {val_loss:.3f} ")
        if terms := {name: total / max(state["epoch_loss_count"], 1) for name, total in state.get("epoch_term_sums", {}).items()}:
            record.update(terms)  # a CoCa's weighted contrastive_loss and caption_loss, whose sum is the loss
            print("  = " + " + ".join(f"{name} {value:.3f}" for name, value in terms.items()))
        if self.evaluator.due(epoch + 1, cfg["Epoch"]):
            metrics = self.evaluator(self.model)
            summary["metrics"] = metrics
            record.update(metrics)
            print("recall: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if "_r" in k or k == "r_mean"))
        self.history.append(record)
        weights = plain_state_dict(self.model)
        if (epoch + 1) % cfg["save_period"] == 0 or epoch + 1 == cfg["Epoch"]:
            self.save_weights(weights, save_dir / f"ep{epoch + 1:03d}-loss{train_loss:.3f}-val_loss{val_loss:.3f}.pth")
        if val_loss <= state["best_val_loss"]:
            state["best_val_loss"] = val_loss
            self.save_weights(weights, save_dir / "best_epoch_weights.pth")
        self.save_weights(weights, save_dir / "last_epoch_weights.pth")
        if self.tuning.get("lora_r", 0) > 0:
            save_adapter(self.model, save_dir / "last_epoch_lora")
        state["step"] = self.steps_per_epoch
        summary["state"] = str(self.save_state())
        state["step"] = 0

    def save_weights(self, weights: dict, path: Path) -> None:
        # The architecture goes beside each file: phi='auto' then knows the activation and head counts.
        save_weights(weights, path, self.config, self.phi, self.preprocess, self.text_language)

    def finish(self) -> dict:
        if self.history is not None:
            self.history.close()
        if self.cfg["wise_ft_alpha"] is not None and self.info.is_main:
            self.summary["wise_ft"] = str(_save_wise_ft(self.cfg, self.phi, plain_state_dict(self.model),
                                                        self.save_dir, self.text_language))
        self.summary["bad_steps"] = self.state["bad_steps"]
        return self.summary


def _save_wise_ft(cfg: dict, phi: str, finetuned: dict, save_dir: Path, text_language: str | None) -> Path:
    """The WiSE-FT blend of the final weights with the starting ones, rebuilt as the run began them."""
    from utils.finetune.wise_ft import interpolate

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        # "custom" (no table row) names no architecture to build: the starting weights' own is read again.
        start, _, _ = init_model("auto" if phi == "custom" else phi, cfg["model_path"], cfg["bert_path"])
        if loss_name(cfg.get("loss", ""), start) == "sigmoid":
            add_logit_bias(start)  # as the run added it: the blend starts from the bias it trained from
    alpha = cfg["wise_ft_alpha"]
    path = save_dir / f"wise_ft_alpha{alpha:g}_weights.pth"
    save_weights(interpolate(start.state_dict(), finetuned, alpha, (cfg["model_path"] or "random init",
                                                                     "the final weights")), path, start.config, phi,
                 preprocess_of(start), text_language)
    print(f"WiSE-FT: (1 - {alpha:g}) x starting weights + {alpha:g} x final weights saved to {path}")
    return path
