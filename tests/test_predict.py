"""predict.py driven as a user would: through stdin, with bad paths first."""
from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip import CLIP
from tests.conftest import run_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def _predict(capsys, monkeypatch):
    """predict.py with these arguments reading this standard input, in this process (tests/conftest.run_script)."""
    def run(args, stdin=""):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        return run_script("predict.py", *args, capsys=capsys)
    return run


def test_loop_survives_bad_input_then_answers_and_exits_on_eof(tiny_weights, tmp_path, _predict):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "truncated.jpg").write_bytes((ROOT / "img" / "example.jpg").read_bytes()[:300])
    # 196M pixels: over twice PIL's bomb limit, so opening it is refused instead of eating the memory.
    Image.new("1", (14000, 14000)).save(tmp_path / "huge.png")
    stdin = "\n".join([str(tmp_path / "missing.jpg"), str(tmp_path), str(tmp_path / "notes.txt"),
                       str(tmp_path / "truncated.jpg"), str(tmp_path / "huge.png"),
                       str(ROOT / "img" / "example.jpg")]) + "\n"
    result = _predict(["--model_path", tiny_weights, "--phi", "auto", "--captions", "a red circle", "a blue square"],
                      stdin)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("cannot open") == 5 and "DecompressionBombError" in result.stdout
    assert result.stdout.count("Input image path: ") == 7  # six answers, then EOF
    probs = [float(p) for p in re.findall(r"^(?:Input image path: )?(\d\.\d{4})  ", result.stdout, re.M)]
    assert len(probs) == 2 and sum(probs) == pytest.approx(1.0, abs=2e-4)
    assert "Traceback" not in result.stderr


def test_empty_line_exits_and_image_flag_answers_once(tiny_weights, _predict):
    assert _predict(["--model_path", tiny_weights, "--phi", "tiny/VIT-T-8"], "\n").returncode == 0
    once = _predict(["--model_path", tiny_weights, "--phi", "tiny/VIT-T-8", "--image", ROOT / "img" / "example.jpg"])
    assert once.returncode == 0 and len(once.stdout.strip().splitlines()) == 4


def test_missing_weights_is_one_clear_line(tmp_path, _predict):
    result = _predict(["--model_path", tmp_path / "none.pth"])
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_detect_image_matches_features_by_hand(tiny_weights):
    model = CLIP(model_path=str(tiny_weights), phi="tiny/VIT-T-8", cuda=False)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8))
    texts = ["a red circle", "two blue squares", ""]
    probs = model.detect_image(picture, texts)
    assert probs.shape == (1, 3)
    image_features, text_features = model.detect_image_for_eval([picture], texts)
    with torch.no_grad():
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        expected = (model.net.logit_scale.exp() * image_features @ text_features.t()).softmax(-1)
    assert np.allclose(probs, expected.numpy(), atol=1e-6)


def test_bf16_inference_is_close_to_fp32(tiny_weights):
    import warnings

    pixels = torch.randn(4, 3, 64, 64)
    fp32 = CLIP(model_path=str(tiny_weights), phi="tiny/VIT-T-8", cuda=False).detect_image_for_eval(pixels)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bf16 = CLIP(model_path=str(tiny_weights), phi="tiny/VIT-T-8", cuda=False,
                    precision="bf16").detect_image_for_eval(pixels)[0]
    # A CPU without bf16 units is told that fp32 is faster there; one with them is not.
    slow = not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert [str(w.message).split(" runs ")[0] for w in caught] == (["precision='bf16' on a CPU without bf16 units"]
                                                                    if slow else [])
    assert bf16.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(fp32, bf16.float()).min() > 0.99


def test_image_flag_with_an_unreadable_image_says_what_failed_and_exits_2(tiny_weights, tmp_path, _predict):
    (tmp_path / "notes.jpg").write_text("not an image")
    result = _predict(["--model_path", tiny_weights, "--phi", "auto", "--image", tmp_path / "notes.jpg"])
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: cannot open '{tmp_path / 'notes.jpg'}' (UnidentifiedImageError")
    assert "try again" not in result.stderr


def test_input_paths_are_checked_before_the_model_loads(tiny_weights, tmp_path, _predict, monkeypatch):
    import clip

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(clip.CLIP, "__init__", no_model)
    model = ["--model_path", tiny_weights, "--phi", "tiny/VIT-T-8"]
    for args, expected in (
            (["--image", tmp_path / "missing.jpg"], f"image {tmp_path / 'missing.jpg'} does not exist"),
            (["--image", tmp_path], f"image {tmp_path} is a folder"),
            (["--mode", "dir_predict", "--dir_origin_path", tmp_path / "none"], f"dir_origin_path {tmp_path / 'none'} "
             "is not a folder"),
            (["--mode", "search", "--dir_origin_path", tmp_path / "none"], f"dir_origin_path {tmp_path / 'none'}"),
            (["--labels", "dog", "--templates", tmp_path / "t.json"], f"templates file {tmp_path / 't.json'} does not "
             "exist")):
        result = _predict(model + args)
        assert result.returncode == 2 and result.stderr.startswith(f"error: {expected}"), (args, result.stderr)
    (tmp_path / "classes" / "dog").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "classes" / "dog" / "a.png")
    result = run_script("eval.py", *model, "--eval_type", "zeroshot", "--datasets_path", tmp_path / "classes",
                        "--templates", tmp_path / "t.json", "--output", tmp_path / "out.json")
    assert result.returncode == 2 and result.stderr.startswith(f"error: templates file {tmp_path / 't.json'}")
