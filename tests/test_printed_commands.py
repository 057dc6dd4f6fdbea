"""Every command the project prints or shows in --help runs as printed, on a fresh clone after the demo.

The clone is a folder laid out as a checkout (img/, model_data/, datasets/toy/) where `train.py --demo en` has run;
commands run in it as the command line runs them (tests/conftest.run_script), under umask 0022, and every file
they write must then be readable by others (mode 0644)."""
from __future__ import annotations

import csv
import io
import json
import os
import shlex
import stat
import sys
from pathlib import Path

import pytest

from datasets.make_toy import make_toy_dataset
from tests.conftest import run_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train.py", "eval.py", "predict.py", "datasets/convert.py", "datasets/curate.py")


def commands(text: str) -> list[list[str]]:
    """The `python ...` commands in printed text, continuation lines joined, comments dropped."""
    found, current = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if current is None and stripped.startswith("python "):
            current = ""
        if current is not None:
            current += " " + stripped.rstrip("\\")
            if not stripped.endswith("\\"):
                found.append(shlex.split(current, comments=True))
                current = None
    return found


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A checkout's layout with the demo run in it: (folder, the demo's output). The current directory and the
    umask (0022) are this module's while it runs."""
    folder = tmp_path_factory.mktemp("clone")
    for shipped in ("img", "model_data"):  # read-only files as a clone has them; outputs beside them are real
        (folder / shipped).mkdir()
        for path in (ROOT / shipped).iterdir():
            if path.is_file():
                (folder / shipped / path.name).symlink_to(path)
    # The toy set as the demo generates it, smaller: 64 training images are one batch of the default size.
    make_toy_dataset(folder / "datasets" / "toy", n_train=64, n_val=8, seed=1)
    cwd, umask = Path.cwd(), os.umask(0o022)
    os.chdir(folder)
    try:
        demo = run_script("train.py", "--demo", "en", "--Epoch", "1", "--batch_size", "16", "--num_workers", "0",
                          threads=1)
        assert demo.returncode == 0, demo.stderr[-3000:]
        assert "Warning" not in demo.stderr, demo.stderr[-3000:]
        yield folder, demo.stdout
    finally:
        os.chdir(cwd)
        os.umask(umask)


def _run(command: list[str], monkeypatch, *extra: str):
    assert command[0] == "python" and command[1] in SCRIPTS, command
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # the loops of predict and search end at once
    result = run_script(command[1], *command[2:], *extra, threads=1)
    assert result.returncode == 0, (shlex.join(command), result.stderr[-3000:])
    return result


def test_every_printed_command_runs_on_a_fresh_clone_after_the_demo(clone, monkeypatch):
    import uvicorn

    folder, demo_output = clone
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(kwargs))  # web: serving is the end

    # Each script's --help, in the order its examples build on each other (eval's use train's fine-tuned weights).
    templates = []
    for script in SCRIPTS:
        shown = run_script(script, "--help")
        assert shown.returncode == 0
        examples = commands(shown.stdout.split("\noptions:")[0])
        assert examples, script
        for command in examples:
            if any("<" in part for part in command):  # a template: <...> stands for the user's own files
                templates.append(command)
            elif command[1:3] != ["train.py", "--demo"]:  # the demo is the fixture's run
                _run(command, monkeypatch)
    assert len(templates) == 4 and all(c[1] in ("eval.py", "datasets/convert.py") for c in templates)
    assert served and served[0]["port"] == 7860
    # search and web indexed img/ into one index of their own, keyed by the folder.
    assert [p.name[:4] for p in Path("logs/search_index").iterdir()] == ["img_"]

    # The demo says what it wrote, then its next steps with this run's paths and real captions (tensorboard is
    # not ours: its folder must exist).
    log_dir = next(Path("logs/demo_en").glob("loss_*"))
    assert "written: weights logs/demo_en/last_epoch_weights.pth" in demo_output
    assert f"log folder {log_dir}/ (epoch_loss.png, epoch_recall.png," in demo_output
    steps = commands(demo_output.split("next:\n")[1])
    assert [c[1] for c in steps] == ["predict.py", "eval.py"]
    predict, evaluate = steps
    assert len(predict[predict.index("--captions") + 1:]) == 3
    assert len(_run(predict, monkeypatch).stdout.splitlines()) == 3  # one probability per caption
    assert "r_mean" in _run(evaluate, monkeypatch).stdout
    board = demo_output.split("next:\n")[1].strip().splitlines()[-1].split()
    assert board == ["tensorboard", "--logdir", "logs/demo_en"] and Path(board[2]).is_dir()

    # README, "Bring your own data": captions as CSV, converted; the line convert prints trains on them from the
    # demo's weights. Cut to one step: the line keeps train.py's 100 epochs, which are the user's to choose.
    with open("captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        for split in ("train", "val"):
            for entry in json.loads(Path(f"datasets/toy/en_{split}.json").read_text()):
                writer.writerow([f"datasets/toy/{entry['image']}", entry["caption"][0]])
    convert = _run(["python", "datasets/convert.py", "--source", "csv", "--input", "captions.csv", "--output_dir",
                    "datasets/mine", "--name", "mine"], monkeypatch)
    [printed] = [line for line in convert.stdout.splitlines() if line.startswith("train with: ")]
    command = shlex.split(printed.removeprefix("train with: "))
    assert command[command.index("--model_path") + 1] == "logs/demo_en/last_epoch_weights.pth"
    _run(command, monkeypatch, "--stop_after_steps", "1")

    # Everything the commands wrote (weights, states, plots, results, CSV, index, WiSE-FT, ONNX) is 0644.
    written = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()
               and not p.is_relative_to(folder / "datasets" / "toy")]
    kinds = {p.suffix for p in written}
    assert {".pth", ".pt", ".png", ".json", ".csv", ".safetensors", ".onnx"} <= kinds, kinds
    private = [f"{p.relative_to(folder)} {oct(stat.S_IMODE(p.stat().st_mode))}" for p in written
               if stat.S_IMODE(p.stat().st_mode) != 0o644]
    assert not private, private


def test_the_default_search_index_is_one_per_folder(tmp_path):
    from utils.predict.inputs import index_dir

    config = {"index_dir": "", "dir_origin_path": str(tmp_path / "a" / "photos")}
    first = index_dir(config)
    assert Path(first).parent == Path("logs/search_index") and Path(first).name.startswith("photos_")
    assert index_dir({**config, "dir_origin_path": str(tmp_path / "b" / "photos")}) != first  # same name, other folder
    assert index_dir({**config, "dir_origin_path": str(tmp_path / "a" / "photos") + "/"}) == first
    assert index_dir({**config, "index_dir": "mine"}) == "mine"


def test_the_readme_help_sample_is_the_real_text(monkeypatch):
    """README's `python eval.py --help` sample is cut from the text the script prints at 120 columns."""
    monkeypatch.setenv("COLUMNS", "120")
    shown = run_script("eval.py", "--help").stdout.splitlines()
    after = (ROOT / "README.md").read_text(encoding="utf-8").split("    $ python eval.py --help\n")[1].splitlines()
    block = after[:next(i for i, line in enumerate(after) if line and not line.startswith("    "))]
    sample = [line[4:] for line in block if line.strip() not in ("", "...")]  # "...": lines left out
    assert len(sample) > 10 and [line for line in sample if line not in shown] == []
