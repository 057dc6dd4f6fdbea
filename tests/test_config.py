import pytest

from utils.config import config_block, parse_overrides
from utils.errors import UserError

CONFIG = {"Cuda": True, "batch_size": 64, "Init_lr": 1e-4, "phi": "openai/VIT-B-32", "precision": None,
          "captions": ["a dog", "a cat"], "input_shape": [224, 224]}


def test_each_type_is_parsed_by_its_default():
    out = parse_overrides(CONFIG, ["--Cuda", "false", "--batch_size", "8", "--Init_lr", "3e-4", "--phi=tiny/VIT-T-8",
                                   "--precision", "bf16", "--captions", "a red circle, big", "a square",
                                   "--input_shape", "64", "64"])
    assert out == {"Cuda": False, "batch_size": 8, "Init_lr": 3e-4, "phi": "tiny/VIT-T-8", "precision": "bf16",
                   "captions": ["a red circle, big", "a square"], "input_shape": [64, 64]}
    assert CONFIG["batch_size"] == 64  # the defaults are not modified


@pytest.mark.parametrize("argv, fragment", [
    (["--batchsize", "8"], "unknown option --batchsize"),
    (["--Cuda", "maybe"], "true or false"),
    (["--batch_size", "eight"], "expects a number"),
    (["--phi"], "needs a value"),
    (["phi", "x"], "expected --name value"),
])
def test_bad_flags_name_the_problem(argv, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_overrides(CONFIG, argv)


def test_config_block_keeps_plain_module_variables():
    import os
    namespace = {"os": os, "phi": "x", "_private": 1, "Epoch": 3, "fn": print}
    assert config_block(namespace) == {"phi": "x", "Epoch": 3}
