"""train.py and search say what their inputs hold before working: repeated entries, train/val overlap, captions
longer than the text tower reads (issue 27)."""
from __future__ import annotations

import json

import pytest

from utils.data.toy import make_toy_dataset
from nets import get_config
from tests.conftest import run_script
from tests.test_search import tiny_weights_and_photos
from tests.test_training import train, train_args
from utils.tokenizer import build_tokenizer


def test_truncated_is_exactly_where_the_ids_are_cut():
    from utils.tokenizer import truncated

    for tokenizer in (build_tokenizer("openai", 16), build_tokenizer("bert", 16)):
        fits = "word " * 14  # 14 tokens and the two special ones fill 16 exactly (BERT: one per word too)
        assert not truncated(tokenizer, fits) and truncated(tokenizer, fits + "word")
        assert (tokenizer.ids(fits)[0] != tokenizer.pad_token_id).sum() == 16
        assert not truncated(tokenizer, "")
    bpe = build_tokenizer("openai", 77)
    # Many bytes per token, few tokens: not cut however long the text is in bytes.
    assert not truncated(bpe, "\u00e9" * 60) and len(bpe.encode("\u00e9" * 60)) <= 75


def test_the_report_counts_repeats_overlap_and_long_captions():
    from utils.data.preflight import input_report

    tokenizer = build_tokenizer("openai", 16)
    long = "a very long caption " * 5
    train_entries = ([{"image": "a.jpg", "caption": ["a cat"]}] * 3 + [{"image": "b.jpg", "caption": [long, "b"]},
                     {"image": "./c.jpg", "caption": ["c"]}, {"image": "a.jpg", "caption": ["another caption"]}])
    val_entries = [{"image": "c.jpg", "caption": ["c"]}, {"image": "d.jpg", "caption": [long]}]
    assert input_report(train_entries, val_entries, tokenizer) == [
        "training file: 2 of its 6 entries repeat an earlier one exactly (same image and captions; a.jpg is there "
        "3 times): each is trained on as often as it appears",
        "1 of the 2 validation images are in the training file too (e.g. c.jpg): the validation loss and recall on "
        "them measure memory, not how well the model generalises",
        "captions longer than the text tower's 16 tokens: 1 of 7 in the training file, 1 of 2 in the validation "
        "file; they are truncated (the text tower reads only their start)"]
    clean = [{"image": "x.jpg", "caption": ["x"]}]
    assert input_report(clean, [{"image": "y.jpg", "caption": ["y"]}], tokenizer) == []


@pytest.mark.slow
def test_train_py_reports_its_inputs_before_training(tmp_path, capsys):
    """50,000 entries of one image, a val image in the train file, over-long captions: today not a word."""
    toy = tmp_path / "toy"
    make_toy_dataset(toy, n_train=24, n_val=8, seed=1)
    train_entries = json.loads((toy / "en_train.json").read_text())
    val_entries = json.loads((toy / "en_val.json").read_text())
    room = get_config("tiny/VIT-T-8").text.context_length
    train_entries[0]["caption"] = ["a dog " * room]
    changed = train_entries + [train_entries[1]] * 5 + [val_entries[0]]
    (toy / "en_train.json").write_text(json.dumps(changed))
    result = train(train_args(toy, tmp_path / "logs", Epoch=1, eval_period=1), capsys)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    repeated = next(i for i, line in enumerate(lines) if line.startswith("training file: 5 of its 30 entries repeat"))
    assert f"{train_entries[1]['image']} is there 6 times" in lines[repeated]
    assert any(line.startswith("1 of the 8 validation images are in the training file too") for line in lines)
    cut = [line for line in lines if line.startswith(f"captions longer than the text tower's {room} tokens: 1 of ")]
    assert len(cut) == 1 and "they are truncated" in cut[0]
    assert repeated < next(i for i, line in enumerate(lines) if line.startswith("Epoch 1/1"))


def test_search_says_when_a_query_was_truncated(tmp_path, capsys):
    weights, photos = tiny_weights_and_photos(tmp_path, 2)
    room = get_config("tiny/VIT-T-8").text.context_length

    def run(query: str) -> str:
        code, out, err = run_script("predict.py", "--mode", "search", "--model_path", weights, "--phi", "auto",
                                    "--dir_origin_path", photos, "--index_dir", tmp_path / "index", "--top_k", 2,
                                    "--query", query, capsys=capsys)
        assert code == 0, err[-2000:]
        return out

    note = f"the query is longer than the text tower's {room} tokens: only its start is searched"
    assert note in run("red " * (room - 1)).splitlines()
    assert note not in run("red " * (room - 2))
