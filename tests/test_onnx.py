"""ONNX export (predict.py --mode export_onnx) and onnxruntime-only prediction (--mode predict_onnx).

Exactness claims, with their tolerances: the fixed-shape text paths equal the packed/trimmed ones within 1e-5;
onnxruntime's fp32 features equal PyTorch's within 1e-4 (tiny, a ViT-B/32-shaped model, both BERT heads; batch
1 and 7; short, medium and full text lengths); fp16 files within 2% of the fp32 features' scale; the numpy
preprocessing equals the torchvision transform within 1e-5, and predict_onnx's probabilities equal
`CLIP.detect_image`'s and `CLIP.classify`'s within 1e-3 on a real JPEG. Each model is exported once per module.
"""
from __future__ import annotations

import dataclasses
import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip import CLIP
from nets import CLIPConfig, TextConfig, VisionConfig, build_model, get_config
from tests.conftest import SMALL, bert_config, random_tokens, run_script
from utils.data.images import eval_transform, open_rgb
from utils.data.preprocess import LETTERBOX_FILL, OPENAI_MEAN, OPENAI_STD
from utils.export import onnx_export
from utils.export.onnx_export import run_session, session
from utils.export.onnx_predict import OnnxCLIP
from utils.tokenizer import trim_padding
from utils.ort_sessions import STOP_SPINNING
from utils.export.preprocess import pixels
from nets.onnx_towers import encoders, export_tower

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "img" / "example.jpg"
# ViT-B/32's geometry (224 px, patch 32, width 768, 12 heads; text width 512, 8 heads), one layer per tower.
B32_SHAPED = CLIPConfig(embed_dim=512,
                        vision=VisionConfig(image_size=224, patch_size=32, width=768, layers=1, heads=12),
                        text=TextConfig(kind="openai", context_length=77, vocab_size=49408, width=512, layers=1,
                                        heads=8))
# Short, medium and full context.
LENGTHS = (4, 20, 77)


class _Output:
    """A stand-in for capsys in module-scoped fixtures: what run_script's script printed."""

    def __init__(self):
        self.out, self.err = io.StringIO(), io.StringIO()

    def readouterr(self) -> tuple[str, str]:
        out, err = self.out.getvalue(), self.err.getvalue()
        self.out.seek(0), self.out.truncate(), self.err.seek(0), self.err.truncate()
        return out, err


def _script(*args):
    output = _Output()
    with redirect_stdout(output.out), redirect_stderr(output.err):
        return run_script("predict.py", *args, capsys=output)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(weights file, PyTorch model, export folder, export's output) of tiny/VIT-T-8 through predict.py."""
    folder = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(3)
    net = build_model(get_config("tiny/VIT-T-8")).eval()
    torch.save(net.state_dict(), folder / "tiny.pth")
    result = _script("--mode", "export_onnx", "--model_path", folder / "tiny.pth", "--phi", "tiny/VIT-T-8",
                     "--export_dir", folder / "export")
    assert result.returncode == 0, result.stderr
    return folder / "tiny.pth", net, folder / "export", result.stdout


def _sessions(net: torch.nn.Module) -> dict:
    return {name: session(export_tower(encoder, torch.float32)) for name, encoder in encoders(net).items()}


@pytest.fixture(scope="module")
def b32():
    torch.manual_seed(4)
    net = build_model(B32_SHAPED).eval()
    return net, _sessions(net)


@pytest.fixture(scope="module")
def bert():
    """self-cn's head (pooler, ln_final), one layer; Chinese-CLIP's differs only after BertModel and its
    full-length path is held to the trimmed one below."""
    torch.manual_seed(5)
    config = bert_config("bert-pooler", 52)
    net = build_model(dataclasses.replace(config, text=dataclasses.replace(config.text, layers=1))).eval()
    return net, {"text": session(export_tower(encoders(net)["text"], torch.float32))}


def _bert_tokens(n: int, length: int, seed: int = 0) -> torch.Tensor:
    """[CLS] ids [SEP] then [PAD] rows of varied lengths, the longest filling `length`."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        used = length - 2 if i == 0 else int(torch.randint(0, length - 1, (1,), generator=g))
        tokens[i, 0], tokens[i, used + 1] = 101, 102
        tokens[i, 1:used + 1] = torch.randint(670, 21000, (used,), generator=g)
    return tokens


def _openai_tokens(n: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """random_tokens cut to `length` columns, the first row's EOT in the last one."""
    tokens = random_tokens(n, vocab, 77, seed=seed, max_len=length - 1)[:, :length].clone()
    tokens[0] = 0
    tokens[0, 0], tokens[0, 1:length - 1], tokens[0, length - 1] = vocab - 2, 7, vocab - 1
    return tokens


def _max_difference(sess, inputs: torch.Tensor, expected: torch.Tensor) -> float:
    return float(np.abs(run_session(sess, inputs.numpy()) - expected.numpy()).max())


@pytest.mark.parametrize("config", [SMALL, get_config("tiny/VIT-T-8")], ids=["small", "tiny"])
def test_padded_text_path_equals_packed_forward_within_1e5(config):
    torch.manual_seed(0)
    text = build_model(config).text.eval()
    with torch.no_grad():
        for seed, length in enumerate((77, 12)):
            tokens = random_tokens(9, config.text.vocab_size, 77, seed=seed, max_len=length - 2)[:, :length]
            assert torch.allclose(text.forward_padded(tokens), text(tokens), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert-pooler", "bert-cls"])
def test_bert_full_length_path_equals_trimmed_forward_within_1e5(kind):
    torch.manual_seed(0)
    text = build_model(bert_config(kind, 52)).text.eval()
    tokens = _bert_tokens(7, 52, seed=1)
    tokens[:, 30:] = 0  # trailing padding columns that forward trims and forward_padded keeps
    with torch.no_grad():
        assert torch.allclose(text.forward_padded(tokens), text(tokens), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_export_writes_the_files_and_reports_parity(tiny):
    _, net, folder, printed = tiny
    assert {p.name for p in folder.iterdir()} == {"image.onnx", "text.onnx", "config.json",
                                                   "bpe_simple_vocab_16e6.txt.gz"}
    config = json.loads((folder / "config.json").read_text())
    assert config["phi"] == "tiny/VIT-T-8" and config["image_size"] == 64 and config["context_length"] == 77
    assert config["mean"] == list(OPENAI_MEAN) and config["std"] == list(OPENAI_STD)
    assert config["resize_mode"] == "shortest" and config["interpolation"] == "bicubic"
    assert config["dtype"] == "float32" and config["features"] == "unnormalised" and config["opset"] >= 17
    assert config["logit_scale"] == pytest.approx(net.logit_scale.exp().item())
    for name in ("image.onnx", "text.onnx"):
        line = next(line for line in printed.splitlines() if line.startswith(name))
        assert float(line.split("= ")[1].split()[0]) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 7])
def test_onnxruntime_equals_pytorch_within_1e4_tiny(tiny, batch):
    _, net, folder, _ = tiny
    sessions = {name: session(folder / f"{name}.onnx") for name in ("image", "text")}
    _check_parity(net, sessions, batch)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 7])
def test_onnxruntime_equals_pytorch_within_1e4_b32_shaped(b32, batch):
    _check_parity(*b32, batch)


def _check_parity(net, sessions, batch: int) -> None:
    size = net.config.vision.image_size
    pixels_in = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        assert _max_difference(sessions["image"], pixels_in, net.encode_image(pixels_in)) < 1e-4
        for length in LENGTHS:
            tokens = _openai_tokens(batch, length, net.config.text.vocab_size, seed=length)
            # Against the packed forward, on the given columns and on full 77-column rows.
            assert _max_difference(sessions["text"], tokens, net.encode_text(tokens)) < 1e-4
            full = torch.nn.functional.pad(tokens, (0, 77 - length))
            assert _max_difference(sessions["text"], full, net.encode_text(full)) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 7])
def test_onnxruntime_equals_pytorch_within_1e4_bert(bert, batch):
    net, sessions = bert
    with torch.no_grad():
        for length in (4, 20, 52):
            tokens = _bert_tokens(batch, length, seed=length)
            assert _max_difference(sessions["text"], tokens, net.encode_text(tokens)) < 1e-4
            full = torch.nn.functional.pad(tokens, (0, 52 - length))
            assert _max_difference(sessions["text"], full, net.encode_text(full)) < 1e-4


@pytest.mark.slow
def test_fp16_text_export_runs_in_onnxruntime_within_2_percent():
    """The text file only: the image tower's ops are a subset of the text tower's plus one convolution."""
    torch.manual_seed(6)
    net = build_model(SMALL).eval()
    tokens = random_tokens(7, SMALL.text.vocab_size, 77, seed=2)
    with torch.no_grad():
        expected = net.encode_text(tokens).numpy()
    got = run_session(session(export_tower(encoders(net.half())["text"], torch.float16)), tokens.numpy())
    assert got.dtype == np.float16
    assert np.abs(got.astype(np.float32) - expected).max() < 0.02 * np.abs(expected).max()


@pytest.mark.parametrize("letterbox", [False, True])
def test_numpy_preprocessing_equals_the_torchvision_transform_within_1e5(letterbox):
    config = {"image_size": 64, "mean": OPENAI_MEAN, "std": OPENAI_STD, "letterbox": letterbox,
              "letterbox_fill": LETTERBOX_FILL, "dtype": "float32"}
    rng = np.random.default_rng(0)
    images = [open_rgb(IMAGE)] + [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                                  for h, w in ((37, 50), (300, 201), (64, 64), (20, 90))]
    expected = torch.stack([eval_transform(64, letterbox)(image) for image in images]).numpy()
    assert np.abs(pixels(images, config) - expected).max() < 1e-5


def test_trim_padding_keeps_every_end_token():
    tokens = np.array([[5, 9, 0, 0, 0], [5, 0, 7, 9, 0]])
    assert trim_padding(tokens).tolist() == [[5, 9, 0, 0], [5, 0, 7, 9]]


def _probabilities(stdout: str) -> dict[str, float]:
    pairs = (line.split(None, 1) for line in stdout.splitlines() if line.strip())
    return {name: float(p) for p, name in pairs}


@pytest.mark.slow
def test_predict_onnx_scores_captions_and_labels_as_pytorch_within_1e3(tiny, capsys):
    weights, _, folder, _ = tiny
    model = CLIP(model_path=str(weights), phi="tiny/VIT-T-8", cuda=False)
    captions = ["a dog", "a photo of a cat on a sofa", "a red car", "一只猫"]
    result = run_script("predict.py", "--mode", "predict_onnx", "--export_dir", folder, "--image", IMAGE,
                        "--captions", *captions, capsys=capsys)
    assert result.returncode == 0, result.stderr
    expected = model.detect_image(open_rgb(IMAGE), captions)[0]
    got = _probabilities(result.stdout)
    assert sorted(got) == sorted(captions)
    assert max(abs(got[c] - p) for c, p in zip(captions, expected)) < 1e-3

    labels = ["dog", "cat", "car"]
    result = run_script("predict.py", "--mode", "predict_onnx", "--export_dir", folder, "--image", IMAGE,
                        "--labels", *labels, "--templates", "a photo of a {c}.", capsys=capsys)
    assert result.returncode == 0, result.stderr
    expected = model.classify(open_rgb(IMAGE), model.class_embeddings(labels, "a photo of a {c}."))[0]
    got = _probabilities(result.stdout)
    assert max(abs(got[c] - p) for c, p in zip(labels, expected)) < 1e-3


@pytest.mark.slow
def test_predict_onnx_runs_where_torch_cannot_be_imported(tiny, capsys):
    """A deployment needs onnxruntime, not torch: the same answers with torch and torchvision unimportable."""
    import subprocess
    import sys

    _, _, folder, _ = tiny
    args = ["--mode", "predict_onnx", "--export_dir", str(folder), "--image", str(IMAGE), "--labels", "dog", "cat"]
    code = ("import runpy, sys; sys.modules['torch'] = sys.modules['torchvision'] = None; "
            f"sys.argv = ['predict.py', *{args!r}]; runpy.run_path('predict.py', run_name='__main__')")
    without = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert without.returncode == 0, without.stderr
    with_torch = run_script("predict.py", *args, capsys=capsys)
    assert _probabilities(without.stdout) == pytest.approx(_probabilities(with_torch.stdout), abs=1e-6)


@pytest.mark.slow
def test_onnx_clip_matches_detect_image_on_a_batch_of_its_own_calls(tiny):
    weights, _, folder, _ = tiny
    onnx_model = OnnxCLIP(folder)
    model = CLIP(model_path=str(weights), phi="tiny/VIT-T-8", cuda=False)
    image_features, text_features = model.detect_image_for_eval([open_rgb(IMAGE)] * 2, ["a dog", "a cat"])
    assert np.abs(onnx_model.encode_image(onnx_model.preprocess([open_rgb(IMAGE)] * 2))
                  - image_features.numpy()).max() < 1e-4
    assert np.abs(onnx_model.encode_text(onnx_model.tokenize(["a dog", "a cat"])) - text_features.numpy()).max() < 1e-4


def test_onnx_clip_sessions_stop_spinning_after_a_run(tiny):
    """Spinning threads of one tower's session hold the cores the other's runs on next (utils/ort_sessions.py)."""
    onnx_model = OnnxCLIP(tiny[2], threads=1)
    for runner in (onnx_model.image_session, onnx_model.text_session):
        assert runner.get_session_options().get_session_config_entry(STOP_SPINNING) == "1"
        assert runner.get_session_options().intra_op_num_threads == 1


def test_predict_onnx_without_an_export_is_one_line(tmp_path, capsys):
    result = run_script("predict.py", "--mode", "predict_onnx", "--export_dir", tmp_path / "none", "--image", IMAGE,
                        capsys=capsys)
    assert result.returncode == 2
    assert result.stderr.startswith("error: export_dir") and "--mode export_onnx" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_predict_onnx_with_a_damaged_file_is_one_line(tmp_path, capsys):
    for name, data in (("config.json", b'{"phi": "tiny/VIT-T-8"}'), ("image.onnx", b"not onnx"),
                       ("text.onnx", b"not onnx")):
        (tmp_path / name).write_bytes(data)
    result = run_script("predict.py", "--mode", "predict_onnx", "--export_dir", tmp_path, "--image", IMAGE,
                        capsys=capsys)
    assert result.returncode == 2
    assert result.stderr.startswith("error: onnxruntime cannot load") and "image.onnx" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_export_to_an_unwritable_folder_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setattr(onnx_export, "export_files", lambda *a, **k: pytest.fail("exported before the check"))
    result = run_script("predict.py", "--mode", "export_onnx", "--model_path", "", "--phi", "tiny/VIT-T-8",
                        "--export_dir", tmp_path / "a_file" / "onnx", capsys=capsys)
    assert result.returncode == 2
    assert result.stderr.startswith("error: export_dir") and "not writable" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_failed_export_leaves_the_earlier_one_intact(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "export"
    folder.mkdir()
    earlier = {"image.onnx": b"old image", "text.onnx": b"old text", "config.json": b"{}"}
    for name, data in earlier.items():
        (folder / name).write_bytes(data)
    new = {"image.onnx": b"new image", "text.onnx": b"new text", "config.json": b'{"new": 1}'}
    monkeypatch.setattr(onnx_export, "export_files", lambda *a, **k: dict(new))
    real_fsync, calls = onnx_export.os.fsync, []

    def disk_full_on_the_second_file(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(onnx_export.os, "fsync", disk_full_on_the_second_file)
    result = run_script("predict.py", "--mode", "export_onnx", "--model_path", "", "--phi", "tiny/VIT-T-8",
                        "--export_dir", folder, capsys=capsys)
    assert result.returncode == 2 and "No space left" in result.stderr and "free on its filesystem" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == earlier  # no new file, no temporary left

    def writer_breaks(fd):  # not an OSError: still one line, and still nothing half-written left
        raise RuntimeError("unexpected pos 4096 vs 2048")

    monkeypatch.setattr(onnx_export.os, "fsync", writer_breaks)
    result = run_script("predict.py", "--mode", "export_onnx", "--model_path", "", "--phi", "tiny/VIT-T-8",
                        "--export_dir", folder, capsys=capsys)
    assert result.returncode == 2 and "RuntimeError: unexpected pos" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == earlier


def test_write_files_makes_its_folder(tmp_path):
    # A direct call (the benchmarks', a user's script) into a folder not made yet: the files, not a WriteError.
    folder = tmp_path / "not" / "made" / "yet"
    onnx_export.write_files(folder, {"image.onnx": b"image", "config.json": b"{}"})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {"image.onnx": b"image", "config.json": b"{}"}
