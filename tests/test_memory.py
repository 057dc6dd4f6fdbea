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


# The largest architecture of each family: each says its need and is refused in one line where it cannot fit.
LARGEST = {"EVA": "EVA02-E-14-plus", "OpenAI-style ViT": "ViT-bigG-14", "SigLIP": "ViT-gopt-16-SigLIP2-384",
           "PE-Core": "PE-Core-bigG-14-448", "ConvNeXt": "convnext_xxlarge", "ViTamin": "ViTamin-XL-384",
           "CLIPA": "ViT-bigG-14-CLIPA", "ResNet": "RN50x64", "MobileCLIP": "MobileCLIP2-L-14",
           "HF text": "nllb-clip-large-siglip", "MetaCLIP 2": "ViT-bigG-14-worldwide", "CoCa": "coca_ViT-L-14"}


QUICK = {"EVA", "OpenAI-style ViT", "SigLIP"}  # the three; the others (seconds each) with the slow tests


@pytest.mark.parametrize("family", [f if f in QUICK else pytest.param(f, marks=pytest.mark.slow) for f in LARGEST])
def test_the_largest_of_each_family_is_refused_in_one_line_before_any_allocation(family, monkeypatch):
    """The need is the meta-device build's parameters in fp32, said before anything is located, read or built."""
    from utils.weights import load as load_module

    name = LARGEST[family]
    need = memory.parameter_count(get_config(name)) * 4  # the meta-device build's parameters and buffers, in fp32
    assert need > memory.GiB  # MobileCLIP's largest, 1.6 GiB, is the smallest of these
    monkeypatch.setattr(memory, "free_bytes", lambda device="cpu": need // 2)

    def allocation(*args, **kwargs):
        raise AssertionError("a weight was located, read or built before the refusal")

    for step in ("locate", "read_checkpoint", "_built_for_loading", "build_model"):
        monkeypatch.setattr(load_module, step, allocation)
    with pytest.raises(UserError) as e:
        load_model("some-tag", name)
    message = str(e.value)
    assert "\n" not in message and name in message and "GiB of RAM" in message
    said = float(message.split("needs about ")[1].split(" GiB")[0])
    assert abs(said - need / memory.GiB) <= 0.05 + 1e-9, (said, need / memory.GiB)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) for n in
                                  ("EVA02-E-14", "EVA01-g-14-plus", "ViT-H-14-CLIPA-336", "ViT-SO400M-14-SigLIP")])
def test_more_large_rows_are_refused_in_one_line(name, monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda device="cpu": memory.GiB // 4)
    with pytest.raises(UserError, match=f"{name}'s weights needs about"):
        load_model("some-tag", name)


def test_a_large_model_says_its_need_on_the_gpu_before_loading_to_the_cpu(monkeypatch):
    """CLIP(cuda=True) with a phi of the table checks the GPU's free memory before it reads any weight."""
    import clip as clip_module

    monkeypatch.setattr(clip_module, "resolve_device", lambda cuda: torch.device("cuda"))
    monkeypatch.setattr(memory, "free_bytes", lambda device="cpu": memory.GiB if torch.device(device).type == "cuda"
                        else 1024 * memory.GiB)
    monkeypatch.setattr(clip_module, "load", lambda *a: (_ for _ in ()).throw(AssertionError("loaded first")))
    with pytest.raises(UserError) as e:
        clip_module.CLIP(model_path="laion2b_s39b_b160k", phi="ViT-bigG-14", cuda=True, precision="fp16")
    message = str(e.value)
    assert "GPU memory" in message and "\n" not in message
    assert 4.5 < float(message.split("needs about ")[1].split(" GiB")[0]) < 5  # fp16: half of 9.5 GiB


def _eva02_config():
    from tests.test_family_jobs import FAMILIES

    return FAMILIES["eva02"]()


@pytest.mark.parametrize("job", ["load_model", "init_model"])
def test_a_load_with_computed_buffers_takes_the_files_tensors_and_builds_no_second_copy(job, tmp_path, monkeypatch):
    """EVA's and PE-Core's towers compute RoPE tables (buffers outside the state dict) at construction: the model is
    built with its parameters on the meta device, its buffers for real, and the file's tensors become its weights."""
    from utils.weights import load as load_module
    from utils.weights.arch import save_weights

    config = _eva02_config()
    net = build_model(config)
    assert set(dict(net.named_buffers())) - set(net.state_dict())  # the case: buffers no file holds
    save_weights(net.state_dict(), tmp_path / "eva.pth", config, "custom")
    read = load_module.read_checkpoint
    files = []
    monkeypatch.setattr(load_module, "read_checkpoint", lambda path: files.append(read(path)) or files[-1])
    real_builds = []
    real_build = load_module.build_model

    def build(c):
        model = real_build(c)
        real_builds.extend(n for n, p in model.named_parameters() if not p.is_meta)
        return model

    monkeypatch.setattr(load_module, "build_model", build)
    if job == "load_model":
        model, _ = load_model(tmp_path / "eva.pth", "auto")
    else:
        model, _, _ = load_module.init_model("auto", tmp_path / "eva.pth")
    file_tensors = {t.data_ptr() for t in files[0].state_dict.values()}
    assert all(p.data_ptr() in file_tensors for p in model.parameters())
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    for name, buffer in net.named_buffers():
        torch.testing.assert_close(dict(model.named_buffers())[name], buffer, rtol=0, atol=0)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model.eval().encode_image(pixels) - net.eval().encode_image(pixels)).abs().max() <= 1e-6
    assert not real_builds  # no parameter was ever allocated besides the file's
