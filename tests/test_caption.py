"""predict.py --mode caption end to end on a tiny random CoCa (an open_clip folder read with phi="auto"): a caption
per readable image into train.py's JSON list, unreadable ones listed, a rerun resuming without touching what the file
held, a model without a decoder refused in one line, and datasets/curate.py reading the result."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clip import CLIP
from nets import build_model
from nets.open_clip_configs import from_open_clip
from tests.conftest import run_script, small_coca
from utils.predict.generate import Generation, captions, generate

# tests/conftest's SMALL_COCA with OpenAI's vocabulary (the BPE tokenizer decodes the captions).
TINY = small_coca(layers=1, context_length=20, vocab_size=49408)


@pytest.fixture(scope="module")
def coca_folder(tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_model(from_open_clip(TINY))
    folder = tmp_path_factory.mktemp("coca")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder


@pytest.fixture
def photos(tmp_path):
    sklearn = pytest.importorskip("sklearn.datasets")
    folder = tmp_path / "photos"
    (folder / "digits").mkdir(parents=True)
    for name, pixels in zip(("china.jpg", "flower.jpg"), sklearn.load_sample_images().images):
        Image.fromarray(pixels).save(folder / name)
    for i, digit in enumerate(sklearn.load_digits().images[:3]):
        digit = Image.fromarray((digit * 16).astype(np.uint8)).resize((40, 40)).convert("RGB")
        digit.save(folder / "digits" / f"{i}.jpg")
    (folder / "broken.jpg").write_bytes(b"not a picture")
    return folder


def _caption(*args, capsys):
    return run_script("predict.py", "--mode", "caption", *[str(a) for a in args], "--seq_len", "8",
                      "--num_workers", "0", capsys=capsys, threads=1)


def test_caption_writes_resumes_and_curate_reads_the_result(coca_folder, photos, tmp_path, capsys):
    out = tmp_path / "caps" / "captions.json"
    (tmp_path / "caps").mkdir()
    first = _caption("--model_path", coca_folder, "--phi", "auto", "--dir_origin_path", photos, "--output", out,
                     "--batch_size", 2, "--generation", "greedy", capsys=capsys)
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"skipped {photos / 'broken.jpg'}" in first.stdout and "5 images captioned, 0 kept" in first.stdout
    entries = json.loads(out.read_text(encoding="utf-8"))
    assert sorted(e["image"] for e in entries) == ["china.jpg", "digits/0.jpg", "digits/1.jpg", "digits/2.jpg",
                                                   "flower.jpg"]
    assert all(isinstance(e["caption"], list) and len(e["caption"]) == 1 and e["caption"][0] for e in entries)
    # The captions are the batched greedy decoder's, one image at a time through the same pipeline.
    model = CLIP(model_path=str(coca_folder), phi="auto", cuda=False)
    pixels = model.preprocess(model.open_image(photos / entries[0]["image"]))
    ids = generate(model.net, pixels, 49406, 49407, Generation(generation="greedy", seq_len=8))
    assert captions(model.tokenizer, ids) == entries[0]["caption"]

    # A rerun keeps what the file holds, edited by hand too, and captions only the new image.
    entries[0]["caption"] = ["my own words"]
    entries.append({"image": "elsewhere/kept.jpg", "caption": ["not in this folder"]})
    out.write_text(json.dumps(entries), encoding="utf-8")
    Image.new("RGB", (50, 40), (200, 30, 30)).save(photos / "new.png")
    again = _caption("--model_path", coca_folder, "--phi", "auto", "--dir_origin_path", photos, "--output", out,
                     capsys=capsys)  # open_clip's default beam search this time
    assert again.returncode == 0, again.stderr[-2000:]
    assert "1 images captioned, 6 kept from before, 1 unreadable" in again.stdout
    resumed = json.loads(out.read_text(encoding="utf-8"))
    assert resumed[:6] == entries and resumed[6]["image"] == "new.png"

    # docs/captions.md's next steps: curate (JSON Lines out), split with convert, fine-tune one epoch.
    curated = tmp_path / "kept.jsonl"
    result = run_script("datasets/curate.py", "--datasets_path", photos, "--input", out, "--output", curated,
                        "--model_path", coca_folder, "--phi", "auto", "--min_clip_score", "-1", "--duplicates", "list",
                        "--skip_bad_samples", "true",  # the entry of an image not in the folder
                        capsys=capsys, threads=1)
    assert result.returncode == 0, result.stderr[-2000:]
    kept = [json.loads(line) for line in curated.read_text(encoding="utf-8").splitlines()]
    assert {e["image"] for e in kept} == {e["image"] for e in resumed} - {"elsewhere/kept.jpg"}
    split = tmp_path / "split"
    result = run_script("datasets/convert.py", "--source", "jsonl", "--input", curated, "--images", photos,
                        "--output_dir", split, "--name", "mine", "--val_ratio", "0.4", capsys=capsys)
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_script("train.py", "--model_path", coca_folder, "--phi", "auto", "--Cuda", "false", "--datasets_path",
                        split, "--datasets_train_json_path", split / "mine_train.json", "--datasets_val_json_path",
                        split / "mine_val.json", "--batch_size", "2", "--Epoch", "1", "--num_workers", "0",
                        "--save_dir", tmp_path / "run", "--bert_path", "", capsys=capsys, threads=1)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "last_epoch_weights.pth").is_file()


def test_caption_refuses_a_model_without_a_decoder_and_a_file_it_cannot_append_to(photos, tmp_path, capsys):
    no_decoder = _caption("--model_path", "", "--phi", "tiny/VIT-T-8", "--dir_origin_path", photos,
                          "--output", tmp_path / "c.json", capsys=capsys)
    assert no_decoder.returncode == 2 and "needs a CoCa" in no_decoder.stderr
    assert len(no_decoder.stderr.strip().splitlines()) == 1
    (tmp_path / "notes.json").write_text('{"not": "a list"}')
    foreign = _caption("--model_path", "", "--phi", "tiny/VIT-T-8", "--dir_origin_path", photos,
                       "--output", tmp_path / "notes.json", capsys=capsys)
    assert foreign.returncode == 2 and "is not a list of" in foreign.stderr
    assert (tmp_path / "notes.json").read_text() == '{"not": "a list"}'
    default = _caption("--model_path", "", "--phi", "tiny/VIT-T-8", "--dir_origin_path", tmp_path / "missing",
                       capsys=capsys)
    assert default.returncode == 2 and "is not a folder" in default.stderr


def test_the_default_caption_file_is_named_by_the_weights_and_the_folder_as_dir_predicts_csv():
    from pathlib import Path

    from utils.predict.caption import caption_path

    config = {"output": "", "model_path": "logs/run/best.pth", "dir_origin_path": "photos/",
              "dir_save_path": "img_out/"}
    assert caption_path(config) == Path("img_out/captions_run_best_photos.json")
    assert caption_path({**config, "output": "mine.json"}) == Path("mine.json")
