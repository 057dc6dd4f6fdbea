"""One run per save_dir: its lock, the free-space check before training, and what a resume changes."""
from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from utils.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not guarded against each other
    fcntl = None

LOCK_NAME = ".clip_train.lock"


# Descriptors of the locks this process holds. A forked child (a DataLoader worker, a pre-flight pool) closes its
# copies at once: a copy keeps the flock alive, so after a kill -9 the lock would outlive the run by as long as
# its workers take to notice.
_HELD: set[int] = set()


def _close_held_locks() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks)


class SaveDirLock:
    """An OS lock (flock) on a file in save_dir, held for the run's life. The kernel drops it when the process
    ends in any way, kill -9 included, so nothing stale is ever left to clean up. The file names the holder."""

    def __init__(self, save_dir: str | Path):
        self.save_dir = Path(save_dir)
        self.fd: int | None = None

    def acquire(self) -> None:
        from utils.files import check_writable

        check_writable(self.save_dir)
        if fcntl is None:
            return
        path = self.save_dir / LOCK_NAME
        # No O_TRUNC: until the lock is ours, the file holds the other run's name.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UserError(f"save_dir {self.save_dir} is in use by another training run: {holder}. Wait for it to "
                            "end, or give this run another save_dir") from None
        except OSError as e:  # a filesystem without locks (some network mounts): run unguarded
            print(f"warning: cannot lock save_dir {self.save_dir} ({e.strerror or e}); two runs started on it "
                  "would overwrite each other's files", file=sys.stderr)
            os.close(fd)
            return
        self.fd = fd
        _HELD.add(fd)
        holder = {"pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500]}
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(holder).encode())
        except OSError:  # a full disk: the lock holds all the same, a second run just cannot say whose it is
            pass

    def release(self) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None

    def __enter__(self) -> SaveDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"process {info['pid']} ({info['command']}) since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written its name yet
        return "another process"


@contextmanager
def hold_save_dir(save_dir: str | Path, info, device):
    """Rank 0 locks save_dir for the run; every rank learns whether it got it, so when rank 0 stops, the others
    stop too instead of waiting for it in the first collective."""
    from utils.train.distributed import all_true

    lock = SaveDirLock(save_dir)
    refusal = None
    if info.is_main:
        try:
            lock.acquire()
        except UserError as e:
            refusal = e
    if not all_true(refusal is None, info, device):
        if refusal is not None:
            raise refusal
        raise SystemExit(2)  # rank 0 prints why
    if info.is_main:
        _remove_leftovers(Path(save_dir))
    try:
        yield lock
    finally:
        lock.release()


# checkpoint._atomic_write's temporary files: .<name>.<8 random characters>.tmp
_LEFTOVER = re.compile(r"^\..+\.(pth|pt)\.[A-Za-z0-9_]{8}\.tmp$")


def _remove_leftovers(save_dir: Path) -> None:
    """A kill -9 during a save leaves its temporary file. With the lock held no run of ours is writing here,
    so every such file is a leftover."""
    leftovers = [p for p in save_dir.iterdir() if _LEFTOVER.match(p.name) and p.is_file()]
    if leftovers:
        from utils.files import human_size

        size = sum(p.stat().st_size for p in leftovers)
        for path in leftovers:
            path.unlink(missing_ok=True)
        print(f"removed {len(leftovers)} temporary file(s) ({human_size(size)}) left in {save_dir} by an "
              "interrupted save")


def unused_log_dir(save_dir: str | Path) -> Path:
    """loss_<time>, with a suffix when a folder of that name exists: two runs started in the same second
    (one after the other: the lock keeps them apart) never share a log folder."""
    base = Path(save_dir) / time.strftime("loss_%Y_%m_%d_%H_%M_%S")
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}_{n}")
    return candidate


def epoch_bytes(model, optimizer_type: str) -> tuple[int, int]:
    """(weights, training state) bytes one epoch writes: weights three times (epNNN, best, last) and a state with
    the weights and the optimizer's fp32 moments (two for Adam/AdamW, one for SGD) of the trainable parameters."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    moments = 1 if optimizer_type == "sgd" else 2
    return weights, weights + moments * 4 * trainable


def warn_if_short_of_space(save_dir: str | Path, model, optimizer_type: str) -> None:
    from utils.files import free_space, human_size

    free = free_space(save_dir)
    if free is None:
        return
    weights, state = epoch_bytes(model, optimizer_type)
    need = 3 * weights + state
    if free < need:
        print(f"warning: save_dir {save_dir} has {human_size(free)} free, less than one epoch writes (about "
              f"{human_size(need)}: weights {human_size(weights)} x 3 for epNNN/best/last and a training state "
              f"{human_size(state)}); a save will fail. Free some space or choose another save_dir", file=sys.stderr)


# A resume may change these freely: they change neither the weights nor the order the data comes in.
_FREE = frozenset({"num_workers", "eval_flag", "eval_period", "save_period", "keep_states", "stop_after_steps",
                   "resume", "resume_force", "save_dir", "demo", "Cuda", "distributed", "grad_checkpointing",
                   "max_bad_steps", "processes"})
# Not read at a resume: the state holds the weights.
_NOT_READ = frozenset({"model_path", "bert_path"})


def _same(a, b) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and a and b:
        return Path(a).resolve() == Path(b).resolve()  # datasets/x.json and ./datasets/x.json
    return False


def resume_differences(cfg: dict, explicit: dict, saved: dict, path: Path) -> list[str]:
    """Lines naming every setting of this command that differs from the state's run (none: an empty list), the
    last saying whether the run can still match an uninterrupted one. An explicit phi that does not describe
    the state's architecture is refused unless resume_force is set; the state's architecture is used either way."""
    from nets import get_config

    from utils.data.sources.shards import is_shard_source

    train, lines, inexact = saved.get("train", {}), [], []
    # Shards are dealt to processes, then to their dataloader workers: with shards both counts decide the data
    # order. A caption list is dealt as one global batch whatever the number of processes.
    free = _FREE - {"num_workers", "processes"} if is_shard_source(cfg["datasets_train_json_path"]) else _FREE
    phi = explicit.get("phi")
    if phi and phi != "auto" and phi != saved["phi"] and get_config(phi).to_dict() != saved["clip"]:
        if not cfg.get("resume_force"):
            raise UserError(f"phi={phi!r} contradicts the training state {path}, which holds a {saved['phi']} "
                            f"model; drop --phi to resume it, or add --resume_force true to resume it with its own "
                            "architecture anyway")
        lines.append(f"  phi: {phi} given; the state's {saved['phi']} is kept (its weights fit only that)")
    for key, value in cfg.items():
        if key == "phi" or key in free or key not in train or _same(value, train[key]):
            continue
        if key == "text_language" and not value:  # none given: the state's own goes on (utils/train/run.py)
            continue
        if key in _NOT_READ:
            lines.append(f"  {key}: {value} (not read: the state holds the weights)")
            continue
        if key.startswith("lora_"):  # adapters are architecture: training.py rebuilds the state's
            lines.append(f"  {key}: {value} given; the state's {train[key]} is kept")
            continue
        lines.append(f"  {key}: {value} (the state's run: {train[key]})")
        inexact.append(key)
    if not lines:
        return []
    lines.insert(0, f"resume: settings that differ from the state's run ({path}):")
    if inexact:
        lines.append(f"resume: {', '.join(inexact)} changed, so this run will not match an uninterrupted run")
    return lines
