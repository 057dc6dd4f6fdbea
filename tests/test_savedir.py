"""Issue 13: a full disk during a save, two runs in one save_dir, resuming with changed settings, a damaged
newest state. Training runs in this process (tests/conftest.run_script) with the tiny model on the toy set."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from utils.data.toy import make_toy_dataset
from tests.conftest import free_port
from tests.test_training import train, train_args
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
ENOSPC_IN_ZIP = "[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 0"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    make_toy_dataset(root, n_train=24, n_val=8, seed=1)
    return root


def _args(toy: Path, save_dir: Path, **extra) -> list[str]:
    return train_args(toy, save_dir, eval_flag="false", **extra)


def _train(capsys, toy: Path, save_dir: Path, **extra):
    return train(_args(toy, save_dir, **extra), capsys)


def _one_line_error(result, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def _loadable(folder: Path) -> list[str]:
    """Names of the checkpoints in `folder`, each loaded; no hidden temporary file is left."""
    assert not [p.name for p in folder.glob(".*.tmp")], list(folder.iterdir())
    names = sorted(p.name for p in folder.iterdir() if p.suffix in (".pth", ".pt"))
    for name in names:
        torch.load(folder / name, weights_only=True)
    return names


@pytest.fixture(scope="module")
def stopped_state(toy, tmp_path_factory):
    """A state after 2 steps of the tiny model at batch_size 8 (trained once, copied by each test)."""
    folder = tmp_path_factory.mktemp("stopped")
    import importlib.util

    from utils.config import run_script as run  # capsys is per test; this fixture is per module

    spec = importlib.util.spec_from_file_location("script_train_fixture", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        run(vars(module), module.main, _args(toy, folder, stop_after_steps=2))
    except SystemExit as e:
        assert not e.code, e.code
    return next(folder.glob("state_step*.pt"))


def _copy_state(state: Path, folder: Path, step: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (state.name if step is None else f"state_step{step:08d}.pt")
    shutil.copyfile(state, target)
    return target


# 1. A disk that fills up during a save.

class _HalfThenFail:
    """A file that takes half of what it is given, then fails the way torch.save's zip writer reports ENOSPC."""

    def __init__(self, real):
        self.real = real

    def write(self, data):
        self.real.write(data[: len(data) // 2])
        self.real.flush()
        raise RuntimeError(ENOSPC_IN_ZIP)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


def test_a_save_that_fails_mid_write_is_one_line_and_keeps_earlier_checkpoints(toy, tmp_path, capsys, monkeypatch):
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # ep001 fits, best_epoch_weights.pth does not
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 partial zip")
        raise RuntimeError(ENOSPC_IN_ZIP)

    monkeypatch.setattr(torch, "save", save)
    result = _train(capsys, toy, tmp_path, Epoch=1)
    monkeypatch.undo()
    line = _one_line_error(result, "could not write", str(tmp_path / "best_epoch_weights.pth"), "free",
                           "earlier files are intact")
    assert "unexpected pos" in line
    assert [n[:6] for n in _loadable(tmp_path)] == ["ep001-"]


@pytest.mark.parametrize("writer", ["history", "steps", "plot", "tensorboard", "results", "feature cache"])
def test_every_writer_turns_a_failed_write_into_one_message(tmp_path, monkeypatch, writer):
    from utils import files as checkpoint
    from utils.callbacks import LossHistory
    from utils.eval.feature_cache import save_features

    history = LossHistory(tmp_path / "log", tensorboard=writer == "tensorboard")
    history.append({"epoch": 1, "loss": 2.0, "val_loss": 2.1})
    history.log_step(1, 1, loss=2.0, lr=1e-3)
    before = {p.name: p.read_bytes() for p in (tmp_path / "log").iterdir() if p.is_file()}
    if writer == "tensorboard":
        def broken(*args, **kwargs):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(history.writer, "flush", broken)
    else:  # every file write of ours goes through os.fdopen in utils/files.py
        real_fdopen = os.fdopen
        monkeypatch.setattr(checkpoint.os, "fdopen", lambda *a, **k: _HalfThenFail(real_fdopen(*a, **k)))
    actions = {
        "history": lambda: history.append({"epoch": 2, "loss": 1.0, "val_loss": 1.1}),
        "steps": lambda: history.log_step(2, 1, loss=1.0, lr=1e-3),
        "plot": history.plot,
        "tensorboard": lambda: history.append({"epoch": 2, "loss": 1.0}),
        "results": lambda: checkpoint.atomic_write_bytes(b'{"metrics": {}}' * 100, tmp_path / "log" / "eval.json"),
        "feature cache": lambda: save_features(tmp_path / "log", "key", torch.ones(4, 2), torch.ones(8, 2)),
    }
    with pytest.raises(UserError) as err:
        actions[writer]()
    monkeypatch.undo()
    message = str(err.value)
    assert "could not write" in message and str(tmp_path / "log") in message and "free" in message, message
    assert "\n" not in message
    assert ("No space left on device" if writer == "tensorboard" else "unexpected pos") in message
    after = {p.name: p.read_bytes() for p in (tmp_path / "log").iterdir() if p.is_file()}
    if writer != "tensorboard":  # its event file is its own
        assert after == before, writer  # nothing half-written, no temporary file, earlier lines intact
    assert history.records()[0]["epoch"] == 1
    history.close()


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 40 MiB filesystem (tmpfs), where the test may mount one: root on Linux."""
    mount = tmp_path / "small"
    mount.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small filesystem needs root on Linux")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode()[:200]}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_warns_before_training_and_stops_with_one_line(toy, small_filesystem, capsys):
    save_dir = small_filesystem / "run"
    result = _train(capsys, toy, save_dir, Epoch=1)
    assert "free" in result.stderr and "one epoch writes" in result.stderr, result.stderr[-3000:]
    line = _one_line_error(result, f"could not write {save_dir}", "No space left on device")
    assert re.search(r"[1-9][0-9.]* MiB free", line), line  # measured after the temporary file is removed
    assert [n[:6] for n in _loadable(save_dir)] == ["ep001-"]


def test_an_already_full_disk_is_one_line_too(toy, small_filesystem, capsys):
    with (small_filesystem / "filler").open("wb") as f:  # nothing left, the way a disk fills behind a run
        try:
            while True:
                f.write(bytes(1 << 20))
                f.flush()
        except OSError:
            pass
    result = _train(capsys, toy, small_filesystem / "run", Epoch=1)
    assert "0 B free" in result.stderr  # the warning before training
    _one_line_error(result, "could not write", "No space left on device")  # TensorBoard's thread stays quiet


def test_little_free_space_is_a_warning_before_training(toy, tmp_path, capsys, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=5 * 2**20))
    result = _train(capsys, toy, tmp_path, stop_after_steps=1)
    assert result.returncode == 0, result.stderr[-3000:]
    warning = next(line for line in result.stderr.splitlines() if "one epoch writes" in line)
    assert "5.0 MiB free" in warning and str(tmp_path) in warning


# 2. Two runs writing into the same save_dir.

def test_a_second_run_on_a_held_save_dir_stops_before_any_work(toy, tmp_path, capsys):
    from utils.train.savedir import SaveDirLock

    holder = SaveDirLock(tmp_path)
    holder.acquire()
    try:
        result = _train(capsys, toy, tmp_path)
    finally:
        holder.release()
    _one_line_error(result, str(tmp_path), f"process {os.getpid()}", "since", time.strftime("%Y-%m-%d"))
    assert not [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")]  # no weights, no log folder
    assert _train(capsys, toy, tmp_path, stop_after_steps=1).returncode == 0  # released: the next run goes


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    from utils.train.savedir import SaveDirLock

    ready, tell = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: takes the lock, says so, waits to be killed
        try:
            SaveDirLock(tmp_path).acquire()
            os.write(tell, b"held")
            time.sleep(120)
        finally:
            os._exit(0)
    try:
        assert os.read(ready, 4) == b"held"
        with pytest.raises(UserError, match=f"process {pid} "):
            SaveDirLock(tmp_path).acquire()
    finally:
        os.kill(pid, signal.SIGKILL)  # no cleanup runs in the holder
        os.waitpid(pid, 0)
    lock = SaveDirLock(tmp_path)
    lock.acquire()
    lock.release()


def test_a_killed_holders_forked_workers_do_not_keep_its_lock(tmp_path):
    """DataLoader workers are forks of the run: they must not hold its lock after a kill -9 of the run."""
    from utils.train.savedir import SaveDirLock

    ready, tell = os.pipe()
    holder = os.fork()
    if holder == 0:
        try:
            SaveDirLock(tmp_path).acquire()
            worker = os.fork()
            if worker == 0:
                time.sleep(120)
                os._exit(0)
            os.write(tell, f"{worker:>10}".encode())
            time.sleep(120)
        finally:
            os._exit(0)
    worker = int(os.read(ready, 10))
    try:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
        os.kill(worker, 0)  # the worker still runs...
        lock = SaveDirLock(tmp_path)
        lock.acquire()  # ...and the lock is free all the same
        lock.release()
    finally:
        os.kill(worker, signal.SIGKILL)


def test_taking_the_lock_removes_what_a_killed_save_left(tmp_path):
    from utils.train.distributed import DistInfo
    from utils.train.savedir import hold_save_dir

    leftover, own = tmp_path / ".last_epoch_weights.pth.a1qo0azj.tmp", tmp_path / ".notes.tmp"
    leftover.write_bytes(b"half a checkpoint")
    own.write_text("not ours")
    with hold_save_dir(tmp_path, DistInfo(), torch.device("cpu")):
        assert not leftover.exists() and own.exists()


def test_log_folder_names_never_collide(toy, tmp_path, capsys):
    now = time.time()
    taken = [tmp_path / time.strftime("loss_%Y_%m_%d_%H_%M_%S", time.localtime(now + s)) for s in range(-1, 30)]
    for folder in taken:
        folder.mkdir(parents=True, exist_ok=True)
    result = _train(capsys, toy, tmp_path, stop_after_steps=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(not any(folder.iterdir()) for folder in taken)  # nobody else's folder was written into
    assert len(list(tmp_path.glob("loss_*/steps.jsonl"))) == 1


_DDP_RANK = """
import os, sys
sys.path.insert(0, sys.argv[1])
from utils.errors import run_main
from utils.train.distributed import init_distributed, cleanup
from utils.train.savedir import hold_save_dir
import torch
info = init_distributed(True, False)

def main():
    with hold_save_dir(sys.argv[2], info, torch.device("cpu")):
        print("rank", info.rank, "went on", flush=True)

try:
    run_main(main)
finally:
    cleanup(info)
"""


@pytest.mark.slow
def test_ddp_ranks_all_stop_when_rank_0_cannot_take_the_lock(tmp_path):
    from utils.train.savedir import SaveDirLock

    holder = SaveDirLock(tmp_path)
    holder.acquire()
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", _DDP_RANK, str(ROOT), str(tmp_path)], cwd=ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outs = [r.communicate(timeout=60) for r in ranks]
    finally:
        holder.release()
        for r in ranks:
            r.kill()
    assert [r.returncode for r in ranks] == [2, 2], outs
    assert f"process {os.getpid()}" in outs[0][1] and "went on" not in outs[0][0] + outs[1][0], outs
    assert "Traceback" not in outs[0][1] + outs[1][1], outs


# 3. Resuming with settings that differ from the state's.

@pytest.mark.slow
def test_an_explicit_phi_that_contradicts_the_state_is_refused(toy, tmp_path, capsys, stopped_state):
    state = _copy_state(stopped_state, tmp_path)
    result = _train(capsys, toy, tmp_path, resume=state, phi="openai/VIT-B-16", batch_size=16)
    _one_line_error(result, "phi", "openai/VIT-B-16", "tiny/VIT-T-8", str(state), "--resume_force true")


@pytest.mark.slow
def test_resume_with_changed_settings_lists_them_and_says_it_will_not_match(toy, tmp_path, capsys, stopped_state):
    state = _copy_state(stopped_state, tmp_path)
    result = _train(capsys, toy, tmp_path, resume=state, phi="openai/VIT-B-16", batch_size=16, resume_force="true",
                    stop_after_steps=1, eval_period=3, save_period=2)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "batch_size: 16 (the state's run: 8)" in out, out
    assert "phi: openai/VIT-B-16 given; the state's tiny/VIT-T-8 is kept" in out, out
    assert "will not match an uninterrupted run" in out and "batch_size" in out.split("will not match")[0]
    assert "eval_period" not in out and "save_period" not in out  # they do not change the weights
    assert "phi=tiny/VIT-T-8" in out


@pytest.mark.slow
def test_resume_with_only_harmless_changes_is_silent(toy, tmp_path, capsys, stopped_state):
    state = _copy_state(stopped_state, tmp_path)
    result = _train(capsys, toy, tmp_path, resume=state, stop_after_steps=1, eval_period=3, save_period=2,
                    phi="tiny/VIT-T-8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "differ" not in result.stdout and "will not match" not in result.stdout, result.stdout


# 4. A damaged newest state.

@pytest.mark.slow
def test_a_damaged_newest_state_names_the_newest_intact_one(toy, tmp_path, capsys, stopped_state):
    intact = _copy_state(stopped_state, tmp_path, step=2)
    damaged = tmp_path / "state_step00000005.pt"
    damaged.write_bytes(stopped_state.read_bytes()[: 1 << 20])
    result = _train(capsys, toy, tmp_path, resume="auto")
    _one_line_error(result, f"refusing to resume from {damaged}", f"newest intact state is {intact}",
                    f"--resume {intact}")


def test_with_shards_the_worker_count_decides_the_data_order_too():
    from nets import get_config
    from utils.train.savedir import resume_differences

    saved = {"phi": "tiny/VIT-T-8", "clip": get_config("tiny/VIT-T-8").to_dict(),
             "train": {"datasets_train_json_path": "shards/{00..03}.tar", "num_workers": 2, "eval_period": 5}}
    changed = {"datasets_train_json_path": "shards/{00..03}.tar", "num_workers": 1, "eval_period": 1}
    lines = resume_differences(changed, {}, saved, Path("state.pt"))
    assert "  num_workers: 1 (the state's run: 2)" in lines and "will not match" in lines[-1]
    files = {"datasets_train_json_path": "train.json"}
    assert resume_differences({**changed, **files}, {}, {**saved, "train": {**saved["train"], **files}},
                              Path("state.pt")) == []
    # So does the number of processes the shards are dealt to; a caption list is one global batch regardless.
    saved["train"]["processes"] = 2
    lines = resume_differences({**changed, "num_workers": 2, "eval_period": 5, "processes": 1}, {}, saved,
                               Path("state.pt"))
    assert lines[1:] == ["  processes: 1 (the state's run: 2)",
                         "resume: processes changed, so this run will not match an uninterrupted run"]
    assert resume_differences({**changed, **files, "processes": 1}, {},
                              {**saved, "train": {**saved["train"], **files}}, Path("state.pt")) == []


def test_a_resume_without_text_language_goes_on_in_the_states_and_says_nothing_of_it():
    from nets import get_config
    from utils.train.savedir import resume_differences

    saved = {"phi": "tiny/VIT-T-8", "clip": get_config("tiny/VIT-T-8").to_dict(),
             "train": {"datasets_train_json_path": "train.json", "text_language": "fra_Latn"},
             "text_language": "fra_Latn"}
    given = {"datasets_train_json_path": "train.json"}
    assert resume_differences({**given, "text_language": ""}, {}, saved, Path("state.pt")) == []
    lines = resume_differences({**given, "text_language": "deu_Latn"}, {}, saved, Path("state.pt"))
    assert "  text_language: deu_Latn (the state's run: fra_Latn)" in lines and "will not match" in lines[-1]
