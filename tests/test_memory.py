"""A model's memory need: said before large loads, refused in one line when it does not fit, and a load that holds
the weights once (the checkpoint's tensors become the model's), not twice."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from nets import build_model, get_config
from tests.test_training import ROOT
from utils.errors import UserError
from utils.weights import memory
from utils.weights.load import load_model


def test_parameter_count_on_meta_equals_a_built_model():
    config = get_config("tiny/VIT-T-8")
    model = build_model(config)
    assert memory.parameter_count(config) == sum(t.numel() for t in model.state_dict().values())


def test_free_bytes_reads_this_machine():
    free = memory.free_bytes("cpu")
    assert free is None or 0 < free < 2 ** 50


def test_a_model_too_large_for_ram_is_refused_before_any_download(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "free_bytes", lambda device="cpu": 3 * memory.GiB)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))  # a download would fail differently
    with pytest.raises(UserError) as e:
        load_model("laion2b_s39b_b160k", "ViT-bigG-14")
    message = str(e.value)
    assert "\n" not in message and "ViT-bigG-14" in message and "GiB of RAM" in message and "3.0 GiB is free" in message
    need = float(message.split("needs about ")[1].split(" GiB")[0])
    assert 9 < need < 10  # 2.54 billion parameters in fp32


def test_a_large_model_says_its_need_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(memory, "free_bytes", lambda device="cpu": 64 * memory.GiB)
    memory.ensure_fits(memory.parameter_count(get_config("ViT-bigG-14")) * 4, "ViT-bigG-14's weights")
    assert "ViT-bigG-14's weights: about 9.5 GiB of RAM, 64.0 GiB free" in capsys.readouterr().err


def test_tied_tensors_in_a_file_load_as_separate_parameters(tmp_path):
    model = build_model(get_config("tiny/VIT-T-8"))
    state = model.state_dict()
    a, b = "visual.transformer.resblocks.0.ln_1.weight", "visual.transformer.resblocks.1.ln_1.weight"
    state[b] = state[a]
    torch.save(state, tmp_path / "tied.pt")
    loaded, _ = load_model(tmp_path / "tied.pt", "tiny/VIT-T-8")
    params = dict(loaded.named_parameters())
    torch.testing.assert_close(params[a], params[b])
    with torch.no_grad():
        params[a].add_(1.0)
    assert not torch.equal(params[a], params[b])
    assert not any(t.is_meta for t in loaded.state_dict().values())


_PEAK = textwrap.dedent("""
    import resource, sys, torch
    sys.path.insert(0, sys.argv[1])
    from utils.weights.load import load_model
    from nets import build_model, get_config
    if sys.argv[3] == "save":
        torch.save(build_model(get_config("ViT-B-32")).state_dict(), sys.argv[2])
        sys.exit()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model, _ = load_model(sys.argv[2], "ViT-B-32")
    print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
""")


@pytest.mark.slow
def test_loading_holds_the_weights_once_not_twice(tmp_path):
    """ViT-B-32 (605 MB in fp32): the load's peak grows by about one copy of the weights; building the model and
    copying the file into it would grow it by two."""
    path = tmp_path / "b32.pt"
    runs = [subprocess.run([sys.executable, "-c", _PEAK, str(ROOT), str(path), job], capture_output=True, text=True,
                           check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}) for job in ("save", "load")]
    before, peak = map(int, runs[1].stdout.split())  # a fresh process: its peak is the load's
    grown = (peak - before) / path.stat().st_size
    assert grown < 1.4, grown
