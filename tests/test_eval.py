"""eval.py: the original's dict and table, JSON output, a feature cache that knows when it is stale,
and the same numbers as the EvalCallback during training."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from utils.data.toy import make_toy_dataset
from nets import build_model, get_config
from tests.conftest import ScriptResult, run_script
from tests.test_training import train, train_args
from utils.eval.run import RECALL_KEYS


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for one epoch, with the recall its EvalCallback reported."""
    root = tmp_path_factory.mktemp("eval")
    make_toy_dataset(root / "toy", n_train=24, n_val=8, seed=2)
    result = train(train_args(root / "toy", root / "run", Epoch=1, eval_period=1))
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads(next((root / "run").glob("loss_*/history.jsonl")).read_text().splitlines()[-1])
    return root, history


def run_eval(root: Path, *extra: str) -> ScriptResult:
    """eval.py in this process (tests/conftest.run_script), on one thread as the training run was."""
    args = ["--model_path", str(root / "run" / "last_epoch_weights.pth"), "--phi", "auto",
            "--datasets_path", str(root / "toy"), "--datasets_val_json_path", str(root / "toy" / "en_val.json"),
            "--num_workers", "0", "--batch_size", "3", "--cache_dir", str(root / "cache"),
            "--output", str(root / "result.json"), "--overwrite", "true", *extra]
    result = run_script("eval.py", *args, threads=1)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_eval_prints_the_original_dict_a_table_and_writes_json(trained):
    root, history = trained
    result = run_eval(root)
    printed = eval(next(line for line in result.stdout.splitlines() if line.startswith("{'txt_r1'")))
    assert list(printed) == list(RECALL_KEYS)
    assert "image -> text" in result.stdout and "median rank" in result.stdout
    assert "warning: the validation set has only 8 images" in result.stdout
    saved = json.loads((root / "result.json").read_text())
    assert saved["phi"] == "tiny/VIT-T-8" and saved["images"] == 8 and saved["captions"] == 40
    # The training-time EvalCallback and eval.py are one code path: identical numbers.
    for key in RECALL_KEYS + ("txt_mean_rank", "img_median_rank"):
        assert saved["metrics"][key] == pytest.approx(history[key], abs=1e-9), key


def test_feature_cache_is_reused_and_invalidated(trained, tmp_path):
    root, _ = trained
    for path in (root / "cache").glob("*"):
        path.unlink()
    assert "using cached features" not in run_eval(root).stdout
    first = json.loads((root / "result.json").read_text())["metrics"]
    assert len(list((root / "cache").glob("*.safetensors"))) == 1
    again = run_eval(root)
    assert "using cached features" in again.stdout
    assert json.loads((root / "result.json").read_text())["metrics"] == first
    # Any change of weights, preprocessing or dataset file misses the cache.
    assert "using cached features" not in run_eval(root, "--letterbox_image", "true").stdout
    entries = json.loads((root / "toy" / "en_val.json").read_text())
    changed = tmp_path / "val.json"
    changed.write_text(json.dumps(entries[:-1]))
    result = run_eval(root, "--datasets_val_json_path", str(changed))
    assert "using cached features" not in result.stdout and "7 images" in result.stdout
    other = tmp_path / "other.pth"
    torch.save(build_model(get_config("tiny/VIT-T-8")).state_dict(), other)
    assert "using cached features" not in run_eval(root, "--model_path", str(other)).stdout
    count = len(list((root / "cache").glob("*.safetensors")))
    run_eval(root, "--feature_cache", "false")
    assert len(list((root / "cache").glob("*.safetensors"))) == count


def test_an_unwritable_output_is_refused_before_encoding(trained, tmp_path, capsys):
    root, _ = trained
    (tmp_path / "file").write_text("not a folder")
    args = ["--model_path", str(root / "run" / "last_epoch_weights.pth"), "--phi", "auto", "--datasets_path",
            str(root / "toy"), "--datasets_val_json_path", str(root / "toy" / "en_val.json"),
            "--output", str(tmp_path / "file" / "result.json")]
    code, _, err = run_script("eval.py", *args, capsys=capsys)
    assert code == 2 and err.startswith(f"error: output {tmp_path / 'file'} is not writable")


@pytest.mark.slow
def test_results_of_two_runs_get_two_names_and_none_is_replaced_unasked(trained, tmp_path, monkeypatch):
    """Two runs' last_epoch_weights.pth once shared logs/eval_last_epoch_weights_en_val.json; the second silently
    replaced the first's results. Now the run folder is in the name, and an existing result is refused."""
    root, _ = trained
    monkeypatch.chdir(tmp_path)
    for run in ("demo_en", "my_run"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "last_epoch_weights.pth").write_bytes((root / "run" / "last_epoch_weights.pth").read_bytes())

    def evaluate(run: str, *extra) -> ScriptResult:
        return run_script("eval.py", "--model_path", f"{run}/last_epoch_weights.pth", "--phi", "auto",
                          "--datasets_path", root / "toy", "--datasets_val_json_path", root / "toy" / "en_val.json",
                          "--num_workers", "0", "--feature_cache", "false", *extra, threads=1)

    for run in ("demo_en", "my_run"):
        assert evaluate(run).returncode == 0
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [
        "eval_demo_en_last_epoch_weights_en_val.json", "eval_my_run_last_epoch_weights_en_val.json"]
    first = tmp_path / "logs" / "eval_demo_en_last_epoch_weights_en_val.json"
    first.write_text("my notes")
    again = evaluate("demo_en")
    assert again.returncode == 2 and again.stderr == (f"error: {first.relative_to(tmp_path)} already exists; choose "
                                                      "another output, or pass --overwrite true to replace it\n")
    assert first.read_text() == "my notes"
    assert evaluate("demo_en", "--overwrite", "true").returncode == 0 and "metrics" in json.loads(first.read_text())

    # predict.py dir_predict: the CSV is named by weights and folder, and refused when it exists (before loading).
    (tmp_path / "photos").mkdir()
    shutil.copy(root / "toy" / json.loads((root / "toy" / "en_val.json").read_text())[0]["image"],
                tmp_path / "photos" / "a.jpg")
    args = ("--mode", "dir_predict", "--model_path", "my_run/last_epoch_weights.pth", "--phi", "auto",
            "--dir_origin_path", "photos", "--labels", "red", "blue")
    assert run_script("predict.py", *args).returncode == 0
    csv = tmp_path / "img_out" / "predictions_my_run_last_epoch_weights_photos.csv"
    csv.write_text("my edits")
    refused = run_script("predict.py", *args)
    assert refused.returncode == 2 and "predictions_my_run_last_epoch_weights_photos.csv already exists; choose " \
                                       "another dir_save_path, or pass --overwrite true" in refused.stderr
    assert csv.read_text() == "my edits"
    replaced = run_script("predict.py", *args, "--overwrite", "true")
    assert replaced.returncode == 0 and csv.read_text().startswith("path,")
