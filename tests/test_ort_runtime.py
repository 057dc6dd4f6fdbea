"""nets/ort.py, runtime="onnxruntime": the towers answered by onnxruntime give PyTorch's features, from an export
cached by the weights' content, never from another model's export, and PyTorch runs whatever the export does not
cover (changed weights, gradients, training mode, a refused export), said once."""
from __future__ import annotations

import copy
import csv
import pickle

import pytest
import torch
from torch import nn
from PIL import Image
from sklearn.datasets import load_sample_images

import nets.ort as ort_runtime
from clip import CLIP
from nets.ort import OnnxRuntime
from tests.conftest import SMALL, run_script
from tests.test_fast import CONFIGS, SLOW_KINDS, inputs, random_model
from utils.errors import UserError
from utils.ort_sessions import STOP_SPINNING

pytest.importorskip("onnxruntime")

# The export of each tower wrapper kind (GELU variants: tests/test_onnx.py); the other tests reuse the first one's
# weights, so their exports come from the cache.
KINDS = ["vit-quick_gelu", "resnet", "bert-cls"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One export cache for the module: a tower of the same weights is exported once."""
    return tmp_path_factory.mktemp("ort_cache")


def attached(net, cache, lines=None, pad_id=0):
    net.runtime = OnnxRuntime(cache, pad_id, log=(lines.append if lines is not None else lambda line: None))
    return net


def encode(net, pixels, tokens):
    with torch.inference_mode():
        return net.encode_image(pixels), net.encode_text(tokens)


def warm(net, pixels, tokens):
    """The runtime's steady state: PyTorch answers the first LOOKUP_AFTER calls (the last starts looking up the
    export), the next one exports where the cache has none."""
    for _ in range(ort_runtime.LOOKUP_AFTER):
        encode(net, pixels, tokens)
    net.runtime.wait()
    return encode(net, pixels, tokens)


def served(cache, lines=None):
    """SMALL's random model with the runtime in its steady state (onnxruntime answering), `lines` cleared of what the
    start said; with its example inputs."""
    net = attached(random_model(SMALL), cache, lines)
    pixels, tokens = inputs(SMALL, 2)
    warm(net, pixels, tokens)
    if lines is not None:
        lines.clear()
    return net, pixels, tokens


def tower_calls(net) -> list[str]:
    """The towers' PyTorch forwards from here on, by name."""
    calls = []
    for name in ("visual", "text"):
        getattr(net, name).register_forward_hook(lambda *_, name=name: calls.append(name))
    return calls


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k in SLOW_KINDS else k for k in KINDS])
def test_onnxruntime_answers_with_the_towers_features_within_1e_4(kind, cache):
    config = CONFIGS[kind]
    eager = random_model(config)
    net = attached(copy.deepcopy(eager), cache, pad_id=0)
    pixels, tokens = inputs(config, 3)
    want = encode(eager, pixels, tokens)
    warm(net, pixels, tokens)  # exported (the towers run for the check)
    calls = tower_calls(net)
    got = encode(net, pixels, tokens)
    assert calls == []  # answered by onnxruntime, not by the towers
    for g, w in zip(got, want):
        assert g.shape == w.shape and (g - w).abs().max().item() < 1e-4
    # Another batch size and caption length than the export traced: the graphs' axes are free.
    pixels, tokens = inputs(config, 5)
    for g, w in zip(encode(net, pixels, tokens), encode(eager, pixels, tokens)):
        assert (g - w).abs().max().item() < 1e-4
    assert calls == []


def test_a_cached_export_is_loaded_for_the_same_weights_and_never_for_others(cache, monkeypatch):
    eager = random_model(SMALL)
    pixels, tokens = inputs(SMALL, 2)
    warm(attached(copy.deepcopy(eager), cache), pixels, tokens)  # exported here
    folders = {p.parent for p in cache.rglob("*.onnx")}

    def no_export(*args):
        raise AssertionError("exported again")

    monkeypatch.setattr(ort_runtime, "export_or_refuse", no_export)
    again = attached(copy.deepcopy(eager), cache)  # a new start with the same weights: loaded, not exported
    warm(again, pixels, tokens)
    calls = tower_calls(again)
    for g, w in zip(encode(again, pixels, tokens), encode(eager, pixels, tokens)):
        assert (g - w).abs().max().item() < 1e-4
    assert calls == []

    monkeypatch.undo()
    other = copy.deepcopy(eager)
    with torch.no_grad():
        other.visual.proj.add_(0.5)  # one tensor of the image tower differs; the text tower is the same
    other = attached(copy.deepcopy(other), cache)
    warm(other, pixels, tokens)
    got_image, _ = encode(other, pixels, tokens)
    new = {p.parent for p in cache.rglob("*.onnx")} - folders
    assert len(new) == 1 and [p.name for p in next(iter(new)).iterdir()] == ["image.onnx"]
    want_image = encode(copy.deepcopy(other).eval(), pixels, tokens)[0]  # a copy has no runtime: its towers
    assert (got_image - want_image).abs().max().item() < 1e-4
    assert (got_image - encode(eager, pixels, tokens)[0]).abs().max().item() > 1e-2


def test_the_runtime_sessions_stop_spinning_after_a_run(cache):
    """An image then captions, as detect_image runs them: the image session's spinning threads would hold the cores
    (utils/ort_sessions.py)."""
    net = attached(random_model(SMALL), cache)
    warm(net, *inputs(SMALL, 2))
    assert sorted(net.runtime._sessions) == ["image", "text"]
    for session in net.runtime._sessions.values():
        assert session.get_session_options().get_session_config_entry(STOP_SPINNING) == "1"


def test_the_first_call_never_waits_for_hashing_opening_or_exporting(tmp_path):
    lines = []
    eager = random_model(SMALL, seed=7)
    net = attached(copy.deepcopy(eager), tmp_path, lines)  # an empty cache
    pixels, tokens = inputs(SMALL, 2)
    calls = tower_calls(net)
    for g, w in zip(encode(net, pixels, tokens), encode(eager, pixels, tokens)):
        assert (g - w).abs().max().item() < 1e-6
    assert calls == ["visual", "text"] and lines == [] and net.runtime._loading == {}  # nothing started
    for _ in range(ort_runtime.LOOKUP_AFTER - 1):
        encode(net, pixels, tokens)
    assert lines == [] and not list(tmp_path.rglob("*.onnx"))
    net.runtime.wait()
    encode(net, pixels, tokens)  # the call after the lookup exports
    assert len(list(tmp_path.rglob("*.onnx"))) == 2 and len(lines) == 2 and "exporting" in lines[0]


def test_weights_changed_after_the_export_run_in_pytorch_said_once(cache):
    lines = []
    net, pixels, tokens = served(cache, lines)
    with torch.no_grad():
        net.visual.proj.mul_(2.0)  # in place: the export no longer holds these weights
    net.text.load_state_dict(random_model(SMALL, seed=3).text.state_dict())
    fresh = copy.deepcopy(net)
    for _ in range(2):
        for g, w in zip(encode(net, pixels, tokens), encode(fresh, pixels, tokens)):
            assert (g - w).abs().max().item() < 1e-6
    assert lines == [f"runtime onnxruntime: the {name} tower runs in PyTorch (its weights or modules changed since "
                     "they were exported)" for name in ("image", "text")]


def test_a_submodule_swapped_in_after_the_export_runs_in_pytorch(cache):
    # LoRA's injection swaps layers for wrappers that keep the base weights: the tensors the export saw are all
    # still there, unchanged, so only the modules tell.
    lines = []
    net, pixels, tokens = served(cache, lines)
    block = net.visual.transformer.resblocks[0]
    block.mlp.c_fc = _Doubled(block.mlp.c_fc)  # the same tensors, computing something else
    calls = tower_calls(net)
    got = encode(net, pixels, tokens)[0]
    assert calls == ["visual"]  # the text tower is untouched: onnxruntime still answers it
    with torch.inference_mode():
        want = net.visual(pixels)
    assert (got - want).abs().max().item() < 1e-6
    assert lines == ["runtime onnxruntime: the image tower runs in PyTorch (its weights or modules changed since they "
                     "were exported)"]


class _Doubled(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 2 * self.inner(x)


def test_gradients_training_mode_and_other_dtypes_run_the_towers(cache):
    net, pixels, tokens = served(cache)
    calls = tower_calls(net)
    assert net.encode_image(pixels).requires_grad and calls == ["visual"]  # gradients on: the towers
    net.train()
    encode(net, pixels, tokens)
    assert calls == ["visual", "visual", "text"]
    net.eval()
    lines = []
    half = attached(random_model(SMALL).bfloat16(), cache, lines)
    calls = tower_calls(half)
    encode(half, pixels.bfloat16(), tokens)
    assert calls == ["visual", "text"] and len(lines) == 2 and "float32 weights only" in lines[0]


def test_a_refused_export_runs_in_pytorch_said_once(cache, monkeypatch):
    def refuse(encoder, dtype, what):
        raise UserError(f"ONNX export of {what} is refused: the op aten.x.default has no ONNX function")

    monkeypatch.setattr(ort_runtime, "export_or_refuse", refuse)
    lines = []
    eager = random_model(SMALL, seed=5)
    net = attached(copy.deepcopy(eager), cache, lines)
    pixels, tokens = inputs(SMALL, 2)
    for _ in range(3):
        for g, w in zip(encode(net, pixels, tokens), encode(eager, pixels, tokens)):
            assert (g - w).abs().max().item() < 1e-6
        net.runtime.wait()
    refused = [line for line in lines if "runs in PyTorch" in line]
    assert len(refused) == 2 and all("aten.x.default" in line for line in refused)


def test_a_copy_or_a_pickle_of_the_net_has_no_runtime(cache):
    net = attached(random_model(SMALL), cache)
    warm(net, *inputs(SMALL, 1))
    assert copy.deepcopy(net).runtime is None
    assert pickle.loads(pickle.dumps(net)).runtime is None and net.runtime is not None


def test_clip_and_predict_modes_run_it_by_name(tiny_weights, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLIP_CACHE", str(cache))
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    captions = ["a temple", "a flower in a garden", "一只猫"]
    torch_model = CLIP(model_path=str(tiny_weights), phi="auto", cuda=False)
    model = CLIP(model_path=str(tiny_weights), phi="auto", cuda=False, runtime="onnxruntime")
    assert isinstance(model.net.runtime, OnnxRuntime)
    for _ in range(2):
        model.detect_image_for_eval(photos, captions)
    model.net.runtime.wait()
    model.detect_image_for_eval(photos, captions)  # exported (or loaded from the cache) by now
    calls = tower_calls(model.net)
    for g, w in zip(model.detect_image_for_eval(photos, captions), torch_model.detect_image_for_eval(photos, captions)):
        assert (g - w).abs().max().item() < 1e-4
    assert model.detect_image(photos[0], captions) == pytest.approx(torch_model.detect_image(photos[0], captions),
                                                                    abs=1e-5)
    assert calls == []
    with pytest.raises(UserError, match="runtime 'ort' is not one of torch, onnxruntime"):
        CLIP(model_path="", phi="tiny/VIT-T-8", cuda=False, runtime="ort")

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, photo in enumerate(photos):
        photo.save(folder / f"{i}.jpg")
    rows = {}
    for runtime in ("torch", "onnxruntime"):
        result = run_script("predict.py", "--mode", "dir_predict", "--model_path", tiny_weights, "--phi", "auto",
                            "--dir_origin_path", folder, "--dir_save_path", tmp_path / runtime, "--labels", "temple",
                            "flower", "--runtime", runtime, "--batch_size", 1, capsys=capsys)
        assert result.returncode == 0, result.stderr[-2000:]
        [written] = (tmp_path / runtime).glob("*.csv")
        rows[runtime] = list(csv.reader(written.open()))
    assert [r[:2] for r in rows["torch"]] == [r[:2] for r in rows["onnxruntime"]]
    for a, b in zip(rows["torch"][1:], rows["onnxruntime"][1:]):
        assert float(a[2]) == pytest.approx(float(b[2]), abs=1e-4)
    bad = run_script("predict.py", "--runtime", "ort", capsys=capsys)
    assert bad.returncode != 0 and "runtime 'ort' is not one of torch, onnxruntime" in bad.stdout + bad.stderr


def test_runtime_auto_picks_onnxruntime_on_an_avx2_cpu_in_fp32_alone_and_says_which(cache, monkeypatch, capsys):
    import importlib.util

    monkeypatch.setenv("CLIP_CACHE", str(cache))
    find_spec = importlib.util.find_spec
    for capability, installed, precision, chosen in (("AVX2", True, "fp32", "onnxruntime"),
                                                     ("AVX512", True, "fp32", "torch"),
                                                     ("DEFAULT", True, "fp32", "torch"),
                                                     ("AVX2", True, "bf16", "torch"),
                                                     ("AVX2", False, "fp32", "torch")):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a, on=installed: None if name == "onnxruntime" and not on else find_spec(name, *a))
        model = CLIP(model_path="", phi="tiny/VIT-T-8", cuda=False, precision=precision, runtime="auto")
        case = (capability, installed, precision)
        assert isinstance(model.net.runtime, OnnxRuntime) == (chosen == "onnxruntime"), case
        out = capsys.readouterr().out
        assert f"runtime auto: {chosen} (" in out, (case, out)
    assert "pip install onnxruntime" in out
