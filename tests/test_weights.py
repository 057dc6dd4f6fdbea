"""Every weight format round-trips into the same model; bad files are refused with a clear message."""
from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch
import transformers
from safetensors.torch import save_file

from nets import build_model, get_config
from tests.conftest import SMALL, bert_config, random_tokens, reference_for, traces_on_purpose
from tests.test_models import _hf_clip
from utils.errors import UserError
from utils.weights.arch import write_arch
from utils.weights.layouts import openai_to_transformers, transformers_config
from utils.weights.load import load_model, read_checkpoint


def _assert_same_weights(model, state_dict):
    ours = model.state_dict()
    assert set(ours) == set(state_dict)
    for key, value in state_dict.items():
        assert torch.equal(ours[key], value.float()), key


@pytest.fixture(scope="module")
def reference_weights():
    torch.manual_seed(0)
    reference = reference_for(SMALL)
    return reference, {k: v for k, v in reference.state_dict().items() if not k.endswith("attn_mask")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_original_repo_pth(tmp_path, reference_weights, dtype):
    _, sd = reference_weights
    path = tmp_path / "weights.pth"
    torch.save({k: v.to(dtype) for k, v in sd.items()}, path)
    write_arch(path, SMALL)  # a custom architecture: its head count is not in the table
    model, phi = load_model(path, "auto")
    assert phi == "custom" and model.config == SMALL
    _assert_same_weights(model, {k: v.to(dtype) for k, v in sd.items()})


def save_openai_torchscript(model, image_size: int, vocab_size: int, path) -> None:
    """`model` traced and saved in fp16 as OpenAI publishes its weights (`ViT-B-32.pt`, `RN50.pt`); `model` is
    left in fp32, as it was."""
    # OpenAI's archives also carry these three as tensors; they are not weights. (open_clip's model has the
    # last two as ints, put back afterwards.)
    extras = {"input_resolution": image_size, "context_length": 77, "vocab_size": vocab_size}
    kept = {name: model.__dict__.pop(name) for name in extras if name in model.__dict__}
    for name, value in extras.items():
        model.register_buffer(name, torch.tensor(value))
    pixels, tokens = torch.randn(1, 3, image_size, image_size), random_tokens(2, vocab_size)
    traced = torch.jit.trace(model.half().float(), (pixels, tokens), check_trace=False).half()
    torch.jit.save(traced, path)
    for name in extras:
        delattr(model, name)
    model.__dict__.update(kept)
    model.float()


@pytest.mark.slow
@traces_on_purpose
def test_openai_torchscript_archive(tmp_path, reference_weights):
    reference, sd = reference_weights
    path = tmp_path / "ViT-T.pt"
    save_openai_torchscript(reference, 32, 1000, path)
    write_arch(path, SMALL)
    checkpoint = read_checkpoint(path)
    assert checkpoint.layout == "openai"
    model, _ = load_model(path, "auto")
    _assert_same_weights(model, {k: v.half() for k, v in sd.items()})


@pytest.mark.slow
def test_transformers_clip_folder_and_files(tmp_path, reference_weights):
    _, sd = reference_weights
    hf = _hf_clip(SMALL, sd)
    hf.save_pretrained(tmp_path / "hf")
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    for path in (tmp_path / "hf", tmp_path / "hf" / "model.safetensors", tmp_path / "hf" / "pytorch_model.bin"):
        checkpoint = read_checkpoint(path)
        assert checkpoint.layout == "transformers-clip"
        model, _ = load_model(path, "auto")
        _assert_same_weights(model, sd)


def test_transformers_chinese_clip_folder(tmp_path):
    torch.manual_seed(0)
    config = bert_config("bert-cls", 52)
    ours = build_model(config)
    hf_sd = openai_to_transformers(ours.state_dict())
    (tmp_path / "cn").mkdir()
    save_file({k: v.contiguous() for k, v in hf_sd.items()}, tmp_path / "cn" / "model.safetensors")
    transformers_config(config).save_pretrained(tmp_path / "cn")  # config.json: the head counts
    model, _ = load_model(tmp_path / "cn", "auto")
    assert model.config == config
    _assert_same_weights(model, ours.state_dict())


def test_self_cn_original_checkpoint_with_old_position_ids(tmp_path):
    torch.manual_seed(0)
    config = bert_config("bert-pooler", 77)
    sd = build_model(config).state_dict()
    # transformers < 4.31 saved this buffer; the original repo's checkpoints carry it.
    old = {**sd, "transformer.embeddings.position_ids": torch.arange(96)[None]}
    torch.save(old, tmp_path / "self_cn.pth")
    write_arch(tmp_path / "self_cn.pth", config)
    model, _ = load_model(tmp_path / "self_cn.pth", "auto")
    assert model.config.text.kind == "bert-pooler"
    _assert_same_weights(model, sd)


def test_open_clip_checkpoint_with_module_prefix(tmp_path, reference_weights):
    _, sd = reference_weights
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "epoch_3.pt")
    write_arch(tmp_path / "epoch_3.pt", SMALL)
    model, _ = load_model(tmp_path / "epoch_3.pt", "auto")
    _assert_same_weights(model, sd)


def test_named_phi_loads_and_auto_finds_the_table_name(tmp_path):
    sd = build_model(get_config("tiny/VIT-T-8")).state_dict()
    torch.save(sd, tmp_path / "tiny.pth")
    assert load_model(tmp_path / "tiny.pth", "tiny/VIT-T-8")[1] == "tiny/VIT-T-8"
    assert load_model(tmp_path / "tiny.pth", "auto")[1] == "tiny/VIT-T-8"


def test_checkpoint_of_another_phi_names_keys_and_shapes(tmp_path):
    torch.save(build_model(get_config("tiny/VIT-T-8")).state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(UserError) as err:
        load_model(tmp_path / "tiny.pth", "tiny-cn/VIT-T-8")
    message = str(err.value)
    assert "tiny.pth" in message and "tiny-cn/VIT-T-8" in message
    assert "missing keys" in message and "transformer.embeddings.word_embeddings.weight" in message
    assert "looks like phi='tiny/VIT-T-8'" in message


def test_shape_mismatch_is_reported_not_partially_loaded(tmp_path, reference_weights):
    _, sd = reference_weights
    torch.save(sd, tmp_path / "small.pth")
    with pytest.raises(UserError) as err:
        load_model(tmp_path / "small.pth", "tiny/VIT-T-8")
    assert "shape mismatches" in str(err.value) and "visual.positional_embedding" in str(err.value)


def test_missing_file_and_non_weight_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope.pth", "auto")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="not a readable weight file"):
        load_model(tmp_path / "notes.txt", "auto")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="folder without"):
        load_model(tmp_path / "empty", "auto")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"visual.conv1.weight": torch.zeros(1), "payload": _Exploit(marker)}, path)
    with pytest.raises(UserError, match="refusing to load"):
        load_model(path, "auto")
    raw = tmp_path / "evil_legacy.pth"
    raw.write_bytes(pickle.dumps(_Exploit(marker), protocol=2))  # torch's legacy format is protocol 2
    with pytest.raises(UserError):
        load_model(raw, "auto")
    assert not marker.exists()


@pytest.mark.slow
@traces_on_purpose
def test_malicious_torchscript_archive_is_refused(tmp_path, reference_weights):
    reference, _ = reference_weights
    pixels, tokens = torch.randn(1, 3, 32, 32), random_tokens(2, 1000)
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.trace(reference, (pixels, tokens), check_trace=False), path)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("/data.pkl") and item.filename.count("/") == 1:
                data = pickle.dumps(_Exploit(marker), protocol=2)
            dst.writestr(item, data)
    with pytest.raises(UserError, match="refusing"):
        load_model(evil, "auto")
    assert not marker.exists()


def test_transformers_reference_really_differs_when_keys_are_wrong(reference_weights):
    # The converter test above could pass vacuously if the mapping were the identity: check it is not.
    _, sd = reference_weights
    mapped = openai_to_transformers(sd)
    assert "vision_model.encoder.layers.0.self_attn.q_proj.weight" in mapped
    assert torch.equal(mapped["visual_projection.weight"], sd["visual.proj"].t())
    assert isinstance(transformers.CLIPModel, type)
