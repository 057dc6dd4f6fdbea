"""Start fast: a settings mistake or a missing file is reported (exit 2, one line) before torch is imported.

Each script runs in a fresh interpreter whose import system refuses torch, torchvision and transformers: had
the script imported one before checking, it would die of that ImportError (exit 1, a traceback), not exit 2.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from utils.checks import PRECISION_NAMES

ROOT = Path(__file__).resolve().parents[1]
NO_TORCH = r"""
import os, runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "torchvision", "transformers"):
            raise ImportError(f"{name} was imported before the settings were checked")
sys.meta_path.insert(0, NoTorch())
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))  # what `python script.py` does
runpy.run_path(script, run_name="__main__")
"""

CASES = [
    ("train.py", ["--augment", "heavy"], "augment 'heavy' is not one of light, none, strong"),
    ("train.py", ["--optimizer_type", "lion"], "optimizer_type 'lion' is not one of"),
    ("train.py", ["--model_path", "missing.pth"], "model_path missing.pth does not exist"),
    ("train.py", ["--model_path", "", "--datasets_path", "{tmp}", "--datasets_train_json_path", "{tmp}/no.json"],
     "datasets_train_json_path {tmp}/no.json does not exist"),
    ("train.py", ["--Epoch", "0"], "--Epoch must be at least 1"),
    ("eval.py", ["--eval_type", "knn"], "eval_type 'knn' is not one of retrieval, zeroshot, wise_ft"),
    ("eval.py", ["--model_path", "missing.pth"], "model_path missing.pth does not exist"),
    ("eval.py", ["--model_path", "", "--datasets_path", "{tmp}/nowhere"], "datasets_path {tmp}/nowhere does not exist"),
    ("predict.py", ["--mode", "video"], "mode 'video' is not one of predict, dir_predict"),
    ("predict.py", ["--model_path", "missing.pth"], "model_path missing.pth does not exist"),
    ("predict.py", ["--model_path", "", "--image", "{tmp}/missing.jpg"], "image {tmp}/missing.jpg does not exist"),
    ("predict.py", ["--model_path", "", "--mode", "dir_predict", "--dir_origin_path", "{tmp}/none"],
     "dir_origin_path {tmp}/none is not a folder"),
    ("datasets/convert.py", ["--source", "flickr30k"], "source 'flickr30k' is not one of"),
    ("datasets/convert.py", ["--source", "csv", "--input", "{tmp}/missing.csv"], "input {tmp}/missing.csv does not exist"),
    ("datasets/convert.py", ["--resize", "-1"], "resize must be 0"),
]


@pytest.mark.parametrize("script, args, message", CASES, ids=[f"{c[0]}:{c[1][1] or c[1][0]}" for c in CASES])
def test_a_settings_mistake_is_reported_before_torch_is_imported(tmp_path, script, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = subprocess.run([sys.executable, "-c", NO_TORCH, str(ROOT / script), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_precision_names_are_the_devices():
    from utils.device import PRECISIONS

    assert PRECISION_NAMES == tuple(PRECISIONS)
