"""predict.py's modes beyond the loop: dir_predict writes a CSV of the top labels, fps measures speed."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from clip import CLIP
from tests.conftest import run_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def _predict(capsys):
    """predict.py with these arguments, in this process (tests/conftest.run_script)."""
    return lambda *args: run_script("predict.py", *args, capsys=capsys)


def test_dir_predict_writes_the_top_labels_of_every_readable_image(tiny_weights, tmp_path, _predict):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    Image.new("RGB", (50, 30), (200, 20, 20)).save(photos / "red.jpg")
    Image.new("RGB", (30, 50), (20, 20, 200)).save(photos / "sub" / "blue.png")
    (photos / "broken.jpg").write_bytes(b"not a picture")
    (photos / "notes.txt").write_text("ignored: not an image suffix")
    labels = ["red square", "blue square", "cat"]
    result = _predict("--mode", "dir_predict", "--model_path", tiny_weights, "--phi", "auto",
                      "--dir_origin_path", photos, "--dir_save_path", tmp_path / "out", "--labels", *labels, "--templates", "a photo of a {c}.",
                      "--top_k", 2, "--batch_size", 2)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "broken.jpg" in result.stdout and "2 images scored" in result.stdout
    [written] = (tmp_path / "out").glob("predictions_*_tiny_photos.csv")  # named by weights and folder
    rows = list(csv.reader(written.open()))
    assert rows[0] == ["path", "label1", "prob1", "label2", "prob2"]
    assert [r[0] for r in rows[1:]] == ["red.jpg", "sub/blue.png"]
    model = CLIP(model_path=str(tiny_weights), phi="auto", cuda=False)
    classes = model.class_embeddings(labels, "a photo of a {c}.")
    for row, name in zip(rows[1:], ["red.jpg", "sub/blue.png"]):
        probs = model.classify(Image.open(photos / name), classes)[0]
        best = probs.argsort()[::-1][:2]
        assert row[1::2] == [labels[i] for i in best]
        assert [float(p) for p in row[2::2]] == pytest.approx([probs[i] for i in best], abs=1e-4)


def test_dir_predict_with_captions_and_with_nothing_readable(tiny_weights, tmp_path, _predict):
    photos = tmp_path / "p"
    photos.mkdir()
    Image.new("RGB", (40, 40), (10, 200, 10)).save(photos / "g.jpg")
    ok = _predict("--mode", "dir_predict", "--model_path", tiny_weights, "--phi", "auto", "--dir_origin_path", photos,
                  "--dir_save_path", tmp_path / "o", "--captions", "a green thing", "a red thing")
    assert ok.returncode == 0, ok.stderr[-2000:]
    model = CLIP(model_path=str(tiny_weights), phi="auto", cuda=False)
    expected = model.detect_image(Image.open(photos / "g.jpg"), ["a green thing", "a red thing"])[0]
    row = list(csv.reader(next((tmp_path / "o").glob("predictions_*.csv")).open()))[1]
    assert {row[1]: float(row[2]), row[3]: float(row[4])} == pytest.approx(
        {"a green thing": expected[0], "a red thing": expected[1]}, abs=1e-4)
    (photos / "g.jpg").write_bytes(b"broken")
    bad = _predict("--mode", "dir_predict", "--model_path", tiny_weights, "--phi", "auto", "--dir_origin_path", photos,
                   "--dir_save_path", tmp_path / "o2")
    assert bad.returncode == 2 and "none of the 1 images" in bad.stderr and "Traceback" not in bad.stderr
    empty = _predict("--mode", "dir_predict", "--model_path", tiny_weights, "--phi", "auto", "--dir_origin_path",
                     tmp_path / "missing")
    assert empty.returncode == 2 and "is not a folder" in empty.stderr


def test_fps_reports_images_and_captions_per_second(tiny_weights, _predict):
    result = _predict("--mode", "fps", "--model_path", tiny_weights, "--phi", "auto", "--batch_size", 4)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    images = next(line for line in lines if line.startswith("images"))
    captions = next(line for line in lines if line.startswith("captions"))
    assert len(images.split()) == 3 and all(float(x.rstrip("/s")) > 0 for x in images.split()[1:])
    assert len(captions.split()) == 3
    assert _predict("--mode", "paint").stderr.startswith(
        "error: mode 'paint' is not one of predict, dir_predict, search, web, fps")


def test_a_config_block_with_no_captions_and_no_labels_is_one_line(tmp_path, capsys):
    source = (ROOT / "predict.py").read_text()
    edited = source.replace('captions = ["a photo of a dog", "a photo of a cat", "a red circle and a blue square", '
                            '"a green triangle"]', "captions = []")
    assert edited != source
    (tmp_path / "predict.py").write_text(edited)
    code, _, err = run_script(str(tmp_path / "predict.py"), "--model_path", "", "--phi", "tiny/VIT-T-8", "--image",
                              ROOT / "img" / "example.jpg", capsys=capsys)
    assert code == 2 and err.startswith("error: nothing to score against")
