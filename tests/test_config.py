"""The command line of every script: argparse over the config block, --help from its comments, one-line errors."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ScriptResult, run_script
from utils.config import config_block, config_comments, parse_config, parse_overrides
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train.py", "predict.py", "eval.py", "datasets/convert.py", "datasets/curate.py")
CONFIG = {"Cuda": True, "batch_size": 64, "Init_lr": 1e-4, "phi": "openai/VIT-B-32", "precision": None,
          "num_workers": None, "captions": ["a dog", "a cat"], "input_shape": [224, 224]}


def test_each_type_is_parsed_by_its_default_and_only_given_names_come_back():
    out = parse_overrides(CONFIG, ["--Cuda", "false", "--batch_size", "8", "--Init_lr", "3e-4", "--phi=tiny/VIT-T-8",
                                   "--precision", "bf16", "--captions", "a red circle, big", "a square",
                                   "--input_shape", "64", "64", "--num_workers", "2"])
    assert out == {"Cuda": False, "batch_size": 8, "Init_lr": 3e-4, "phi": "tiny/VIT-T-8", "precision": "bf16",
                   "captions": ["a red circle, big", "a square"], "input_shape": [64, 64], "num_workers": 2}
    assert parse_overrides(CONFIG, ["--precision", "auto", "--Cuda=TRUE"]) == {"precision": None, "Cuda": True}
    assert parse_overrides(CONFIG, ["--num_workers", "0", "--precision", "1.5"]) == {"num_workers": 0,
                                                                                      "precision": 1.5}
    assert parse_overrides(CONFIG, ["--Init_lr", "-1e-3"]) == {"Init_lr": -1e-3}  # a negative number is a value
    # ...in a list of numbers too, first or not, beside a glued single value and a list of texts.
    numbers = {**CONFIG, "alphas": [0.0, 1.0], "captions": ["a dog"]}
    assert parse_overrides(numbers, ["--alphas", "-0.5", "0.5", "-1e-3", "--Init_lr", "-1e-3", "--captions", "-5"]) \
        == {"alphas": [-0.5, 0.5, -1e-3], "Init_lr": -1e-3, "captions": ["-5"]}
    assert parse_overrides(CONFIG, []) == {}
    assert CONFIG["batch_size"] == 64  # the defaults are not modified


@pytest.mark.parametrize("argv, message", [
    (["--batchsize", "8"], "unknown option --batchsize; did you mean --batch_size?"),
    (["--init_LR", "1"], "unknown option --init_LR; did you mean --Init_lr?"),
    (["--Cuda", "maybe"], "--Cuda expects true or false, got 'maybe'"),
    (["--batch_size", "eight"], "--batch_size expects a whole number, got 'eight'"),
    (["--batch_size", "1.5"], "--batch_size expects a whole number, got '1.5'"),
    (["--Init_lr", "fast"], "--Init_lr expects a number, got 'fast'"),
    (["--phi"], "--phi needs a value"),
    (["--captions"], "--captions needs at least one value"),
    (["phi", "x"], "unexpected 'phi': settings are written --name value (see --help)"),
    (["-batch_size", "8"], "unknown option -batch_size; did you mean --batch_size?"),
    (["--zzz=1"], "unknown option --zzz; --help lists them"),
])
def test_every_command_line_mistake_is_one_named_line(argv, message):
    with pytest.raises(UserError) as raised:
        parse_overrides(CONFIG, argv)
    assert str(raised.value) == message


@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--seed", "-1"], "--seed must be 0 or more, got -1"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio must be between 0 and 1, got 1.5"),
    (["--num_workers", "two"], "--num_workers must be a whole number, 0 or more, or auto, got 'two'"),
    (["--Init_lr", "0"], "--Init_lr must be above 0, got 0.0"),
])
def test_values_the_type_allows_but_the_scripts_cannot_use_are_refused(argv, message):
    namespace = {"batch_size": 8, "seed": 1, "warmup_ratio": 0.05, "num_workers": None, "Init_lr": 1e-3}
    with pytest.raises(UserError) as raised:
        parse_config(namespace, argv)
    assert str(raised.value) == message
    assert parse_config(namespace, ["--num_workers", "auto"])[0]["num_workers"] is None


def test_comments_above_a_variable_describe_it_and_a_group_shares_one():
    source = '''"""doc"""
import os

# Use the GPU;
# None: when available.
Cuda = None
batch_size = 64  # global batch
# Learning rates.
Init_lr = 1e-4
Min_lr = Init_lr * 0.01

seed = 11
label: str = "x"  # annotated


def f():
    inner = 1  # not a config variable
'''
    assert config_comments(source) == {"Cuda": "Use the GPU; None: when available.", "batch_size": "global batch",
                                       "Init_lr": "Learning rates.", "Min_lr": "Learning rates.", "seed": "",
                                       "label": "annotated"}


def test_config_block_keeps_plain_module_variables():
    import os
    namespace = {"os": os, "phi": "x", "_private": 1, "Epoch": 3, "fn": print}
    assert config_block(namespace) == {"phi": "x", "Epoch": 3}


def _script(name: str, *args: str, capsys=None) -> ScriptResult:
    """`python <name> args` from the repository root: in this process (tests/conftest.run_script) when given
    capsys, else in a new interpreter, which also runs the script's `if __name__ == "__main__"` wiring."""
    if capsys is not None:
        return run_script(name, *args, capsys=capsys)
    return subprocess.run([sys.executable, str(ROOT / name), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture
def in_root(monkeypatch):
    """The shell a subprocess gets: the repository root as the working directory, a 200-column terminal."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("COLUMNS", "200")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_variable_with_its_default_and_comment(script, in_root, capsys):
    namespace = {"__file__": str(ROOT / script)}
    source = (ROOT / script).read_text(encoding="utf-8")
    exec(compile(source.split("\nif __name__")[0], script, "exec"), namespace)  # the whole module, as run
    comments = config_comments(source)
    variables = config_block(namespace)
    # --help in this process; -h in a real interpreter, so each script is run once as a user runs it.
    for flag, capture in (("--help", capsys), ("-h", None)):
        result = _script(script, flag, capsys=capture)
        assert result.returncode == 0 and result.stderr == ""
        assert result.stdout.startswith(f"usage: python {script}")
        text = " ".join(result.stdout.split("--name value):")[1].split())  # the listing, unwrapped
        for name, default in variables.items():
            assert comments[name], f"{script}: {name} has no comment in the config block"
            entry = re.search(rf"--{name} \S+(?: \[\S+ \.\.\.\])? (.*?)\[default: (.*?)\]", text)
            assert entry, f"{script} --help does not list --{name}"
            assert entry.group(1).strip() == " ".join(comments[name].split())
            shown = entry.group(2)
            assert shown == (f"{default:g}" if isinstance(default, float) else
                             repr(default) if isinstance(default, str) else
                             (" ".join(f"{v:g}" if isinstance(v, float) else repr(v) for v in default) or "(empty)")
                             if isinstance(default, list) else str(default))


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("argv, message", [
    (["--Init_Lr", "3e-4"], None),
    (["--datasets_path"], None),
    (["--batch_size", "x"], None),
    (["--Cuda", "perhaps"], "error: --Cuda must be true, false or auto, got 'perhaps'"),
    (["stray"], "error: unexpected 'stray': settings are written --name value (see --help)"),
])
def test_scripts_turn_command_line_mistakes_into_one_line_and_status_2(script, argv, message, in_root, capsys):
    result = _script(script, *argv, capsys=capsys)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    if argv[0] == "--Cuda" and script == "datasets/convert.py":
        assert lines[0] == "error: unknown option --Cuda; --help lists them"
    elif message:
        assert lines[0] == message
    if argv[0] == "--Init_Lr":
        assert lines[0] == ("error: unknown option --Init_Lr; did you mean --Init_lr?" if script == "train.py"
                            else "error: unknown option --Init_Lr; --help lists them")
