"""Bad input gets one clear message before work starts; faults lose nothing. Through the real entry points."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip import CLIP
from utils.data.toy import make_toy_dataset
from nets import build_model, get_config
from tests.conftest import ScriptResult, run_script
from tests.test_training import ROOT, TRAIN_ENV, step_losses, train, train_args
from utils.data.augment import CaptionAugment
from utils.data.images import eval_transform
from utils.data.pictures import ImagePipeline
from utils.data.preflight import preflight
from utils.dataloader import CaptionDataset
from utils.errors import UserError
from utils.files import atomic_save
from utils.tokenizer import build_tokenizer
from utils.train.checkpoint import newest_state


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    make_toy_dataset(root, n_train=24, n_val=8, seed=1)
    return root


def _with_json(toy: Path, tmp_path: Path, text: str) -> list[str]:
    bad = tmp_path / "bad.json"
    bad.write_text(text, encoding="utf-8")
    return train_args(toy, tmp_path / "run", datasets_train_json_path=bad)


def _user_error(result: ScriptResult, *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr[-2000:])


@pytest.mark.parametrize("text, fragments", [
    ('[{"image": "a.jpg", "caption": ["x"]},\n {"image": "b.jpg" "caption": []}]', ["bad.json", "line 2, column 20"]),
    ('{"image": "a.jpg", "caption": ["x"]}', ["bad.json", "must hold a JSON list"]),
    ('[{"image": "train/000000.jpg"}]', ["entry 0", "\"caption\""]),
    ('[{"image": "train/000000.jpg", "caption": []}]', ["entry 0", "non-empty list"]),
    ('[{"image": "train/000000.jpg", "caption": ["ok", 7]}]', ["entry 0", "must be text"]),
])
def test_bad_json_is_one_clear_message(toy, tmp_path, text, fragments, capsys):
    result = train(_with_json(toy, tmp_path, text), capsys)
    _user_error(result, *fragments)
    assert not (tmp_path / "run" / "last_epoch_weights.pth").exists()


def _bad_images_dataset(toy: Path, tmp_path: Path) -> Path:
    entries = json.loads((toy / "en_train.json").read_text())
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "truncated.jpg").write_bytes((toy / entries[0]["image"]).read_bytes()[:400])
    (tmp_path / "text.jpg").write_text("not an image")
    bad = [{"image": str(tmp_path / name), "caption": ["a red circle"]}
           for name in ("missing.jpg", "empty.jpg", "truncated.jpg", "text.jpg")]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(entries + bad))  # absolute paths replace datasets_path when joined
    return path


def test_bad_images_are_all_listed_before_training(toy, tmp_path, capsys):
    path = _bad_images_dataset(toy, tmp_path)
    result = train(train_args(toy, tmp_path / "run", datasets_train_json_path=path), capsys)
    _user_error(result, "4 of 28 entries are unusable", "missing.jpg", "empty (0 bytes)", "truncated.jpg",
                "text.jpg", "skip_bad_samples")


def test_skip_bad_samples_drops_them_and_says_how_many(toy, tmp_path, capsys):
    path = _bad_images_dataset(toy, tmp_path)
    result = train(train_args(toy, tmp_path / "run", datasets_train_json_path=path,
                              skip_bad_samples="true", Epoch=1, eval_flag="false"), capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 of 28 entries are unusable; skipping them" in result.stdout


def test_preflight_lists_the_first_20_and_a_count(tmp_path):
    entries = [{"image": f"missing_{i}.jpg", "caption": ["x"]} for i in range(25)]
    (tmp_path / "a.json").write_text(json.dumps(entries))
    with pytest.raises(UserError) as err:
        preflight(tmp_path / "a.json", tmp_path)
    message = str(err.value)
    assert "25 of 25 entries" in message and "missing_19.jpg" in message and "missing_20.jpg" not in message
    assert "... and 5 more" in message


def _unusual_images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    images = {
        "l.png": rgb.convert("L"), "la.png": rgb.convert("LA"), "p.png": rgb.convert("P"),
        "one_bit.png": rgb.convert("1"), "rgba.png": rgb.convert("RGBA"), "cmyk.jpg": rgb.convert("CMYK"),
        "tiny.png": rgb.resize((3, 2)), "strip.png": rgb.resize((640, 20)),
        "gray16.png": Image.fromarray((rng.integers(0, 65535, (30, 30))).astype(np.uint16)),
    }
    paths = []
    for name, image in images.items():
        image.save(folder / name)
        paths.append(folder / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the upright image is 40 wide, 60 high
    rgb.save(folder / "exif.jpg", exif=exif)
    return paths + [folder / "exif.jpg"]


def test_unusual_but_valid_images_just_work(tmp_path):
    paths = _unusual_images(tmp_path)
    entries = [{"image": p.name, "caption": ["a picture", "", "🙂🚀 emoji", "混合 scripts 和 English",
                                             " ".join(["word"] * 300)]} for p in paths]
    (tmp_path / "set.json").write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    assert len(preflight(tmp_path / "set.json", tmp_path)) == len(paths)
    for kind, level in (("openai", "none"), ("bert", "strong")):
        dataset = CaptionDataset(entries, tmp_path, CaptionAugment(64, level), build_tokenizer(kind, 77))
        for index in range(len(entries)):
            for epoch in range(5):  # each epoch picks another caption
                pixels, tokens = dataset[(epoch, index)]
                assert pixels.shape == (3, 64, 64) and torch.isfinite(pixels).all() and tokens.shape == (77,)
    from utils.data.images import open_rgb
    assert open_rgb(tmp_path / "exif.jpg").size == (40, 60)
    assert np.asarray(open_rgb(tmp_path / "gray16.png")).std() > 20  # scaled, not clipped to white


@pytest.mark.parametrize("extra, fragments", [
    (dict(phi="openai/VIT-X"), ["unknown phi 'openai/VIT-X'", "tiny/VIT-T-8", "cn-clip/VIT-B-16"]),
    (dict(model_path="/nonexistent/w.pth"), ["/nonexistent/w.pth does not exist"]),
    (dict(batch_size=64), ["batch_size 64 is larger than the 24 training samples"]),
    (dict(datasets_path="/nonexistent/data"), ["datasets_path /nonexistent/data does not exist"]),
    (dict(precision="fp16"), ["fp16", "no CUDA device"]),
    (dict(optimizer_type="lion"), ["optimizer_type 'lion'"]),
    (dict(lr_decay_type="linear"), ["lr_decay_type 'linear' is not one of cos, step"]),
    (dict(augment="heavy"), ["augment 'heavy' is not one of light, none, strong"]),
    (dict(Init_Epoch=2), ["Init_Epoch 2 leaves no epoch to train", "below Epoch 2"]),
    (dict(demo="fr"), ["demo 'fr' is not one of en, cn"]),
    (dict(precision="fp8"), ["precision 'fp8' is not one of fp32, fp16, bf16"]),
])
def test_bad_configuration_is_one_clear_message(toy, tmp_path, extra, fragments, capsys):
    _user_error(train(train_args(toy, tmp_path / "run", **extra), capsys), *fragments)


def test_missing_data_is_reported_before_the_model_is_built(toy, tmp_path, capsys, monkeypatch):
    import utils.train.run

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the data's paths were checked")

    monkeypatch.setattr(utils.train.run, "init_model", no_model)
    for setting in ("datasets_train_json_path", "datasets_val_json_path"):
        _user_error(train(train_args(toy, tmp_path / "run", **{setting: tmp_path / "none.json"}), capsys),
                    f"{setting} {tmp_path / 'none.json'} does not exist")


@pytest.fixture
def umask():
    """Sets the process's umask for one test (os.umask returns the old one) and puts it back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def test_written_files_get_the_mode_of_a_new_file_not_0600(tmp_path, umask):
    """mkstemp's 0600 survived the rename: weights, results and plots were readable by their owner only."""
    import stat

    import matplotlib.pyplot as plt

    from utils.files import append_text, atomic_savefig, atomic_write_bytes

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    atomic_save({"w": torch.zeros(2)}, tmp_path / "weights.pth")
    atomic_write_bytes(b"{}", tmp_path / "results.json")
    atomic_savefig(plt.figure(), tmp_path / "plot.png")
    append_text(tmp_path / "history.jsonl", "{}\n")  # os.open with 0666 already: the reference
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == dict.fromkeys(
        ["weights.pth", "results.json", "plot.png", "history.jsonl"], 0o644)
    umask(0o027)
    atomic_write_bytes(b"{}", tmp_path / "team.json")
    assert mode(tmp_path / "team.json") == 0o640
    (tmp_path / "results.json").chmod(0o600)  # a file the user made private stays private when replaced
    atomic_write_bytes(b"[]", tmp_path / "results.json")
    assert mode(tmp_path / "results.json") == 0o600 and (tmp_path / "results.json").read_bytes() == b"[]"
    assert not list(tmp_path.glob(".*.tmp"))
    from utils.files import new_file_mode

    assert new_file_mode() == 0o640  # for writers that make 0600 files of their own (safetensors, mkstemp)


def test_weights_of_another_architecture_and_non_weight_files(toy, tmp_path, capsys):
    torch.save(build_model(get_config("tiny-cn/VIT-T-8")).state_dict(), tmp_path / "cn.pth")
    _user_error(train(train_args(toy, tmp_path / "run", model_path=tmp_path / "cn.pth"), capsys),
                "does not fit phi='tiny/VIT-T-8'", "missing keys", "looks like phi='tiny-cn/VIT-T-8'")
    (tmp_path / "notes.pth").write_text("hello")
    _user_error(train(train_args(toy, tmp_path / "run", model_path=tmp_path / "notes.pth"), capsys),
                "not a readable weight file")


def test_cuda_true_without_cuda_falls_back_with_a_warning(toy, tmp_path, capsys):
    result = train(train_args(toy, tmp_path / "run", Cuda="true", Epoch=1, eval_flag="false"), capsys)
    assert result.returncode == 0 and "no CUDA device is visible" in result.stderr and "device=cpu" in result.stdout


def test_unwritable_save_dir_fails_before_training(toy, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _user_error(train(train_args(toy, tmp_path / "file" / "logs"), capsys), "not writable", "save_dir")


def test_disk_full_while_saving_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    path = tmp_path / "best_epoch_weights.pth"
    atomic_save({"w": torch.ones(3)}, path)

    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match="No space left on device"):
        atomic_save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_by_every_entry_point(toy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with evil.open("wb") as f:
        pickle.dump({"model": _Exploit(marker), "optimizer": {}, "epoch": 0, "config": {}}, f, protocol=2)  # torch's legacy
    # Each entry point in this process (tests/conftest.run_script): the loaders are the same code a new
    # interpreter would run, and an executed payload would leave the marker just the same.
    runs = {
        "train model_path": train(train_args(toy, tmp_path / "r1", model_path=evil), capsys),
        "train resume": train(train_args(toy, tmp_path / "r2", resume=evil), capsys),
        "eval": run_script("eval.py", "--model_path", evil, "--phi", "auto", "--datasets_path", toy,
                           "--datasets_val_json_path", toy / "en_val.json", capsys=capsys),
        "predict": run_script("predict.py", "--model_path", evil, "--image", ROOT / "img" / "example.jpg",
                              capsys=capsys),
    }
    for name, result in runs.items():
        assert "refusing" in result.stderr, (name, result.stderr[-2000:])
        assert result.returncode != 0, name
    with pytest.raises(UserError, match="refusing"):
        CLIP(model_path=str(evil), phi="auto")
    assert not marker.exists()


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_auto_ends_with_the_same_weights(toy, tmp_path, capsys):
    straight = train(train_args(toy, tmp_path / "a", Epoch=3, eval_flag="false"), capsys)
    assert straight.returncode == 0, straight.stderr[-3000:]
    args = train_args(toy, tmp_path / "b", Epoch=3, eval_flag="false")
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=TRAIN_ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while newest_state(tmp_path / "b") is None and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere in epoch 2, maybe while writing weights
    process.send_signal(signal.SIGKILL)
    process.wait()
    for path in (tmp_path / "b").glob("*.pt*"):
        # Every checkpoint on disk is complete. A kill during a write leaves only the hidden temporary file
        # (.name.XXXX.tmp), which no reader looks at.
        if not path.name.startswith(".") and path.suffix in (".pt", ".pth"):  # not the .pth.json records
            torch.load(path, weights_only=True)
    resumed = train(args + ["--resume", "auto"], capsys)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "a" / "last_epoch_weights.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "last_epoch_weights.pth", weights_only=True)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.slow
def test_sigterm_saves_a_resumable_state_and_says_how_to_resume(toy, tmp_path, capsys):
    args = train_args(toy, tmp_path / "run", Epoch=40, eval_flag="false")
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=TRAIN_ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    steps = tmp_path / "run"
    while time.time() < deadline and not any(steps.glob("loss_*/steps.jsonl")):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped (SIGTERM)" in out and "--resume" in out and "Traceback" not in err
    state = newest_state(tmp_path / "run")
    assert state is not None
    resumed = train(args + ["--resume", str(state), "--stop_after_steps", "1"], capsys)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    assert len(step_losses(tmp_path / "run")) >= 2


def test_windows_backslash_paths_load_on_every_platform(tmp_path):
    (tmp_path / "images" / "cats").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "images" / "cats" / "001.jpg")
    # As json.dump writes it on Windows: "images\\cats\\001.jpg" in the file, images\cats\001.jpg as the string.
    (tmp_path / "set.json").write_text('[{"image": "images\\\\cats\\\\001.jpg", "caption": ["a red picture"]}]')
    assert json.loads((tmp_path / "set.json").read_text())[0]["image"] == "images\\cats\\001.jpg"
    entries = preflight(tmp_path / "set.json", tmp_path)
    assert entries == [{"image": "images/cats/001.jpg", "caption": ["a red picture"]}]
    pixels, tokens = CaptionDataset(entries, tmp_path, CaptionAugment(32, "light"), build_tokenizer("openai", 77))[(0, 0)]
    assert pixels.shape == (3, 32, 32) and tokens.shape == (77,)
    pipeline = ImagePipeline(lambda pixels: pixels.flatten(1), eval_transform(32))
    features, positions = pipeline.encode([tmp_path / e["image"] for e in entries]).all()
    assert positions == [0] and features.shape == (1, 3 * 32 * 32)
