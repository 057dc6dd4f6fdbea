"""Training: the real entry point on generated data, DDP equivalence, exact resume, and the pieces."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.data.toy import make_toy_dataset
from nets import build_model, get_config
from tests.conftest import ScriptResult, free_port, run_script
from utils.errors import UserError
from utils.files import atomic_save
from utils.train.checkpoint import load_state, newest_state
from utils.train.distributed import DistInfo
from utils.train.optim import build_optimizer, build_scheduler, param_groups, scaled_lrs
from utils.train.epoch import StopFlag, fit_one_epoch
from utils.weights.load import load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    make_toy_dataset(root, n_train=24, n_val=8, seed=1)
    return root


def train_args(toy: Path, save_dir: Path, phi: str = "tiny/VIT-T-8", lang: str = "en", **extra) -> list[str]:
    args = dict(model_path="", phi=phi, datasets_path=toy, datasets_train_json_path=toy / f"{lang}_train.json",
                datasets_val_json_path=toy / f"{lang}_val.json", batch_size=8, Epoch=2, Init_lr=1e-3,
                scale_lr="false", num_workers=0, save_dir=save_dir, eval_period=2, datasets_random="true",
                bert_path="", seed=3, Cuda="false")
    args.update(extra)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


# One thread: bitwise-comparable runs (thread count changes float summation order), and no oversubscription.
TRAIN_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_train(args: list[str], launcher: list[str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = TRAIN_ENV
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env, **kwargs)


def train(args: list[str], capsys=None) -> ScriptResult:
    """train.py in this process (tests/conftest.run_script) on one torch thread, as TRAIN_ENV runs it in a new
    interpreter; for runs that need no process of their own (a kill, torchrun)."""
    return run_script("train.py", *args, capsys=capsys, threads=1)


def step_losses(save_dir: Path) -> list[float]:
    lines = []
    for log in sorted(save_dir.glob("loss_*/steps.jsonl")):
        lines += [json.loads(line) for line in log.read_text().splitlines()]
    return [r["loss"] for r in sorted(lines, key=lambda r: r["global_step"])]


@pytest.fixture(scope="module")
def default_run(toy, tmp_path_factory) -> tuple[Path, ScriptResult]:
    """train_args' own run (tiny/VIT-T-8, en, 2 epochs), trained once: the smoke test's English case and the
    resume test's uninterrupted reference. Neither writes into its folder."""
    save_dir = tmp_path_factory.mktemp("default_run")
    return save_dir, train(train_args(toy, save_dir))


@pytest.mark.slow
@pytest.mark.parametrize("phi, lang", [("tiny/VIT-T-8", "en"), ("tiny-cn/VIT-T-8", "cn")])
def test_smoke_train_through_entry_point(toy, tmp_path, phi, lang, capsys, request):
    if (phi, lang) == ("tiny/VIT-T-8", "en"):
        tmp_path, result = request.getfixturevalue("default_run")
    else:
        result = train(train_args(toy, tmp_path, phi=phi, lang=lang), capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]  # no deprecated calls of ours, no bad defaults
    assert result.stdout.count("Total Loss:") == 2 and "|| Val Loss:" in result.stdout
    assert "r_mean" in result.stdout
    assert "warning: the validation set has only 8 images, so R@1, R@5 and R@10 mean little" in result.stdout
    names = {p.name for p in tmp_path.iterdir()}
    assert {"best_epoch_weights.pth", "last_epoch_weights.pth"} <= names
    assert any(n.startswith("ep002-loss") and n.endswith(".pth") for n in names)
    log_dir = next(tmp_path.glob("loss_*"))
    history = [json.loads(x) for x in (log_dir / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2] and "r_mean" in history[-1]
    assert (log_dir / "epoch_loss.png").stat().st_size > 0 and (log_dir / "epoch_recall.png").exists()
    assert any(p.name.startswith("events.out.tfevents") for p in log_dir.iterdir())
    assert len(step_losses(tmp_path)) == 6  # 24 images / batch 8 = 3 steps per epoch
    # The weight files are plain OpenAI-layout state dicts that predict/eval (and the original repo) load.
    model, found = load_model(tmp_path / "last_epoch_weights.pth", "auto")
    assert found == phi
    state = load_state(newest_state(tmp_path))
    assert state["config"]["phi"] == phi and state["epoch"] == 1


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(toy, tmp_path, capsys):
    """2 processes train the weights 1 process does. (Each loss's gather across processes is checked without
    torchrun in tests/test_finetune.py, softmax and sigmoid.)"""
    single = train(train_args(toy, tmp_path / "one", Epoch=1), capsys)
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    double = run_train(train_args(toy, tmp_path / "two", Epoch=1, distributed="true"), launcher=launcher)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "processes=2" in double.stdout and "loss=softmax" in double.stdout
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4, (one, two)
    w1 = torch.load(tmp_path / "one" / "last_epoch_weights.pth", weights_only=True)
    w2 = torch.load(tmp_path / "two" / "last_epoch_weights.pth", weights_only=True)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4


@pytest.mark.slow
def test_resume_mid_epoch_ends_with_the_same_weights(toy, tmp_path, capsys, default_run):
    straight_dir, straight = default_run
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = train(train_args(toy, tmp_path / "b", stop_after_steps=2), capsys)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "--resume" in first.stdout and not (tmp_path / "b" / "last_epoch_weights.pth").exists()
    second = train(train_args(toy, tmp_path / "b", resume="auto"), capsys)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    a = torch.load(straight_dir / "last_epoch_weights.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "last_epoch_weights.pth", weights_only=True)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert step_losses(straight_dir) == pytest.approx(step_losses(tmp_path / "b"), abs=1e-6)


@pytest.mark.slow
def test_results_do_not_depend_on_worker_count(toy, tmp_path, capsys):
    zero = train(train_args(toy, tmp_path / "w0", Epoch=1, eval_flag="false"), capsys)
    two = train(train_args(toy, tmp_path / "w2", Epoch=1, eval_flag="false", num_workers=2), capsys)
    assert zero.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert step_losses(tmp_path / "w0") == step_losses(tmp_path / "w2")


def test_schedule_warms_up_then_decays_to_min_lr():
    model = torch.nn.Linear(2, 2)
    for kind in ("cos", "step"):
        optimizer = build_optimizer(model, "adamw", 1e-3, 0.9, 0.0)
        scheduler = build_scheduler(optimizer, kind, total_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5)
        lrs = []
        for _ in range(100):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert lrs[0] == pytest.approx(1e-5) and lrs[10] == pytest.approx(1e-3)
        assert all(a <= b + 1e-12 for a, b in zip(lrs[:10], lrs[1:11]))  # warmup rises
        assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))  # then only falls
        assert lrs[-1] == pytest.approx(1e-5, rel=0.2 if kind == "step" else 0.05)
        if kind == "step":
            assert len(set(round(x, 12) for x in lrs[10:])) == 10  # ten plateaus
        else:
            assert lrs[55] == pytest.approx((1e-3 + 1e-5) / 2, rel=0.05)  # cosine midpoint


def test_original_batch_size_scaling_of_lr():
    assert scaled_lrs(1e-4, 1e-6, 32, "adamw") == pytest.approx((5e-5, 5e-7))
    assert scaled_lrs(1e-5, 1e-7, 32, "adamw") == pytest.approx((3e-5, 3e-7))  # clamped to the original's min
    assert scaled_lrs(1e-4, 1e-6, 256, "adamw")[0] == pytest.approx(1e-4)  # clamped to the original's max
    assert scaled_lrs(1e-2, 1e-4, 64, "sgd") == pytest.approx((1e-2, 1e-4))


def test_no_weight_decay_on_gains_biases_embeddings_and_logit_scale():
    model = build_model(get_config("tiny/VIT-T-8"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    for expected in ("logit_scale", "text.token_embedding.weight", "text.positional_embedding",
                     "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
                     "visual.transformer.resblocks.0.attn.in_proj_bias"):
        assert expected in no_decay_names
    assert {"visual.conv1.weight", "visual.proj", "text.text_projection",
            "visual.transformer.resblocks.0.attn.in_proj_weight"} <= decay_names
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    cn = build_model(get_config("tiny-cn/VIT-T-8"))
    _, cn_no_decay = param_groups(cn, 0.1)
    cn_names = {id(p): n for n, p in cn.named_parameters()}
    assert "text.transformer.embeddings.word_embeddings.weight" in {cn_names[id(p)] for p in cn_no_decay["params"]}


@pytest.mark.slow
@pytest.mark.parametrize("flag, frozen, trained", [("lock_image", "visual.", "text."), ("lock_text", "text.", "visual.")])
def test_lock_flags_freeze_what_they_say(toy, tmp_path, flag, frozen, trained, capsys):
    before = build_model(get_config("tiny/VIT-T-8")).state_dict()
    torch.save(before, tmp_path / "start.pth")
    result = train(train_args(toy, tmp_path / "run", model_path=tmp_path / "start.pth", Epoch=1,
                              eval_flag="false", **{flag: "true"}), capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    after = torch.load(tmp_path / "run" / "last_epoch_weights.pth", weights_only=True)
    model = build_model(get_config("tiny/VIT-T-8"))
    prefix_of = {n.removeprefix("text."): n for n in dict(model.named_parameters())}
    for key in before:
        full = prefix_of.get(key, key)
        if full.startswith(frozen):
            assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(before[k], after[k]) for k in before if prefix_of.get(k, k).startswith(trained))


def _nan_setup(nan_steps):
    model = build_model(get_config("tiny/VIT-T-8"))
    optimizer = build_optimizer(model, "adamw", 1e-3, 0.9, 0.0)
    scheduler = build_scheduler(optimizer, "cos", 10, 0, 1e-3, 1e-5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    calls = {"n": 0}

    def criterion(image_features, text_features, scale):
        loss = (image_features * text_features).sum() * scale
        calls["n"] += 1
        return loss * float("nan") if calls["n"] in nan_steps else loss

    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[:, 0], tokens[:, 1] = 49406, 49407
    loader = [(torch.randn(2, 3, 64, 64), tokens)] * 6
    state = {"global_step": 0, "step": 0, "bad_steps": 0, "bad_in_a_row": 0, "run_start_step": 0,
             "epoch_loss_sum": 0.0, "epoch_loss_count": 0}
    cfg = {"Epoch": 1, "lock_image": False, "lock_text": False, "max_bad_steps": 3, "grad_clip": 0.0,
           "stop_after_steps": 0}
    return model, criterion, optimizer, scheduler, scaler, loader, state, cfg


@pytest.mark.slow
def test_non_finite_steps_are_skipped_and_counted():
    model, criterion, optimizer, scheduler, scaler, loader, state, cfg = _nan_setup({2, 4})
    fit_one_epoch(model, criterion, optimizer, scheduler, scaler, loader, 1, 0, state, cfg, torch.device("cpu"),
                  "fp32", DistInfo(), StopFlag(), None)
    assert state["bad_steps"] == 2 and state["global_step"] == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_persistent_non_finite_loss_stops_with_a_message():
    model, criterion, optimizer, scheduler, scaler, loader, state, cfg = _nan_setup({2, 3, 4, 5})
    with pytest.raises(UserError, match=r"not finite for 3 steps in a row \(epoch 1, step 3\)"):
        fit_one_epoch(model, criterion, optimizer, scheduler, scaler, loader, 1, 0, state, cfg, torch.device("cpu"),
                      "fp32", DistInfo(), StopFlag(), None)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last_epoch_weights.pth"
    atomic_save({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError):
        atomic_save({"a": torch.zeros(2), "b": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


@pytest.mark.slow
def test_fp16_saved_weights_load_back(tmp_path):
    model = build_model(get_config("tiny/VIT-T-8"))
    torch.save({k: v.half() for k, v in model.state_dict().items()}, tmp_path / "half.pth")
    loaded, _ = load_model(tmp_path / "half.pth", "tiny/VIT-T-8")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.half().float())
    assert math.isclose(loaded.logit_scale.item(), model.logit_scale.detach().half().item(), rel_tol=0)


@pytest.mark.slow
def test_partial_init_image_tower_from_checkpoint_text_tower_from_bert_folder(tmp_path):
    from transformers import BertModel

    from nets.text_bert import bert_config
    from utils.weights.load import init_model

    openai_tiny = build_model(get_config("tiny/VIT-T-8"))
    torch.save(openai_tiny.state_dict(), tmp_path / "vit.pth")
    bert = BertModel(bert_config(get_config("tiny-cn/VIT-T-8").text))
    bert.save_pretrained(tmp_path / "bert")
    model, phi, sources = init_model("tiny-cn/VIT-T-8", tmp_path / "vit.pth", tmp_path / "bert")
    assert phi == "tiny-cn/VIT-T-8" and "image tower" in sources[0] and "BERT" in sources[1]
    for key, value in openai_tiny.state_dict().items():
        if key.startswith("visual.") or key == "logit_scale":
            assert torch.equal(model.state_dict()[key], value), key
    # tiny-cn has Chinese-CLIP's [CLS] head: every BERT tensor but the unused pooler is copied.
    copied = model.text.transformer.state_dict()
    assert set(bert.state_dict()) - set(copied) == {"pooler.dense.weight", "pooler.dense.bias"}
    for key, value in copied.items():
        assert torch.equal(bert.state_dict()[key], value), key
    with pytest.raises(UserError, match="holds no transformers model"):
        init_model("tiny-cn/VIT-T-8", tmp_path / "vit.pth", tmp_path / "no_bert_here")


def test_num_workers_auto_is_the_cores_this_process_may_use(monkeypatch):
    from utils.device import loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert loader_workers(None) == 2  # 4 on 2 cores made PyTorch warn on every loader
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert loader_workers(None) == 4
    assert loader_workers(0) == 0 and loader_workers(7) == 7  # a number the user gave is kept


def test_lr_scaling_says_what_it_changed():
    from utils.train.optim import scaling_note

    wanted = (3e-4, 3e-6)
    assert scaling_note(wanted, scaled_lrs(*wanted, 64, "adamw"), 64, "adamw") == (
        "Init_lr 3e-4 -> 1e-4 (x 64/64 = 3e-4, capped at adamw's ceiling 1e-4), Min_lr 3e-6 -> 1e-6 (x 64/64 = "
        "3e-6, capped at adamw's ceiling 1e-6) by the original's batch-size scaling; --scale_lr false keeps yours")
    assert scaling_note((1e-4, 1e-6), scaled_lrs(1e-4, 1e-6, 64, "adamw"), 64, "adamw") is None  # the defaults
    assert scaling_note((1e-4, 1e-6), scaled_lrs(1e-4, 1e-6, 32, "adamw"), 32, "adamw").startswith(
        "Init_lr 1e-4 -> 5e-5 (x 32/64), Min_lr 1e-6 -> 5e-7 (x 32/64) by")
    # The case: 1e-4 x 8/64 is 1.25e-5, so the floor acted, not the scaling alone.
    assert scaling_note((1e-4, 1e-6), scaled_lrs(1e-4, 1e-6, 8, "adamw"), 8, "adamw").startswith(
        "Init_lr 1e-4 -> 3e-5 (x 8/64 = 1.25e-5, raised to adamw's floor 3e-5), Min_lr 1e-6 -> 3e-7 (x 8/64 = "
        "1.25e-7, raised to adamw's floor 3e-7)")
    assert "(x 128/64 = 8e-2, capped at sgd's ceiling 5e-2)" in scaling_note(
        (4e-2, 4e-4), scaled_lrs(4e-2, 4e-4, 128, "sgd"), 128, "sgd")
