"""MobileCLIP's FastViT models (S0-S4) and MobileCLIP2-L-14 against open_clip 3.3: rows equal to what `from_open_clip`
reads from open_clip's JSONs and building open_clip's parameter names and shapes on the meta device; a small FastViT
with a text tower without the causal mask, random weights, saved as an open_clip folder and loaded with phi='auto',
within 1e-4 of open_clip's features; BatchNorm statistics frozen in training; the tower's ONNX export."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nets import build_model, get_config
from nets.open_clip_configs import from_open_clip
from nets.zoo_rows import MOBILECLIP, MOBILECLIP_NON_CAUSAL
from tests.conftest import meta_models_with_open_clips_names_and_shapes
from tests.test_siglip_towers import _move_every_parameter
from tests.test_zoo_timm import _assert_same_features
from utils.weights.load import load_model
from utils.weights.pretrained import PRETRAINED

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

CONFIG_DIR = Path(open_clip.__file__).parent / "model_configs"
NON_CAUSAL = ["MobileCLIP-S1", "MobileCLIP-S2", "MobileCLIP2-S0", "MobileCLIP2-S2", "MobileCLIP2-S3",
              "MobileCLIP2-S4", "MobileCLIP2-L-14"]  # the ViT-B ones: tests/test_zoo_timm.py
# timm names standing for small FastViTs, so that open_clip builds them too: one block a stage, narrow (widths in
# 32s: timm's grouped convolutions); MCi3's fifth stage and LayerNorm2d kept. Attention heads are 32 wide.
TINY_TRUNKS = {"fastvit_mci0_tinytest": ("fastvit_mci0", dict(layers=(1, 1, 1, 1), embed_dims=(32, 32, 64, 64))),
               "fastvit_mci3_tinytest": ("fastvit_mci3", dict(layers=(1, 1, 1, 1, 1),
                                                              embed_dims=(32, 32, 64, 64, 64)))}


def _open_clip_cfg(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def _tiny_cfg(trunk: str, vocab_size: int = 300) -> dict:
    """open_clip's FastViT MobileCLIP JSON with small towers: avg pool, timm's classifier projecting, no causal mask."""
    return dict(embed_dim=48, custom_text=True,
                vision_cfg=dict(image_size=64, timm_model_name=trunk, timm_model_pretrained=False, timm_pool="avg",
                                timm_proj=None, timm_drop=0.0, timm_drop_path=0.0),
                text_cfg=dict(context_length=16, vocab_size=vocab_size, width=32, heads=2, layers=2, no_causal_mask=True))


@pytest.fixture
def tiny_trunks(monkeypatch):
    real_create = timm.create_model

    def create(name, *args, **kwargs):
        if name in TINY_TRUNKS:
            real, overrides = TINY_TRUNKS[name]
            return real_create(real, *args, **{**kwargs, **overrides})
        return real_create(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)


def _open_clip_model(monkeypatch, name: str, cfg: dict):
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, name, cfg)
    model = open_clip.create_model(name, pretrained=None).eval()
    _move_every_parameter(model, seed=1)
    with torch.no_grad():  # BatchNorm statistics off their init too, so that a tower ignoring them would differ
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2.0)
    return model


def test_the_table_has_every_mobileclip_of_open_clip():
    names = [m for m in open_clip.list_models() if m.startswith("MobileCLIP")]
    assert sorted(names) == sorted({**MOBILECLIP, **MOBILECLIP_NON_CAUSAL}) and len(names) == 9
    assert sorted(MOBILECLIP_NON_CAUSAL) == sorted(NON_CAUSAL)
    assert {a for a, _ in open_clip.list_pretrained() if a.startswith("MobileCLIP")} <= {a for a, _ in PRETRAINED}


# One FastViT and the ViT-L in the quick suite; the others (seconds each on the meta device) with the slow ones.
QUICK_ROWS = {"MobileCLIP2-S0", "MobileCLIP2-L-14"}


@pytest.mark.parametrize("name", [n if n in QUICK_ROWS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in NON_CAUSAL])
def test_each_row_is_open_clips_json_and_builds_its_names_and_shapes_on_the_meta_device(name):
    ours = get_config(name)
    assert asdict(ours) == asdict(from_open_clip(_open_clip_cfg(name)))
    assert ours.text.kind == "openai-custom" and not ours.text.causal and ours.text.pool == "argmax"
    reference, _ = meta_models_with_open_clips_names_and_shapes(name, ours)
    assert reference.text.attn_mask is None  # open_clip's tower is bidirectional too


def test_each_tag_has_open_clips_source_and_preprocessing():
    for name in NON_CAUSAL:
        (tag,) = [t for a, t in open_clip.list_pretrained() if a == name]
        cfg, row = open_clip.get_pretrained_cfg(name, tag), PRETRAINED[name, tag]
        assert row.source == "hf-hub:" + cfg["hf_hub"].rstrip("/")
        p = row.preprocess
        assert (p.mean, p.std, p.interpolation, p.resize_mode) == \
            (tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"], cfg["resize_mode"]), name
    assert PRETRAINED["MobileCLIP2-S0", "dfndr2b"].preprocess.std == (1.0, 1.0, 1.0)  # [0, 1] pixels
    assert PRETRAINED["MobileCLIP2-S3", "dfndr2b"].preprocess.std != (1.0, 1.0, 1.0)


def _open_clip_folder(monkeypatch, tmp_path, trunk: str, vocab_size: int = 300):
    """(folder, open_clip's model, its config): open_clip's hub layout of a small MobileCLIP, random weights."""
    cfg = _tiny_cfg(trunk, vocab_size)
    reference = _open_clip_model(monkeypatch, f"tiny-{trunk}", cfg)
    folder = tmp_path / "mobileclip-tiny"
    folder.mkdir()
    preprocess = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "interpolation": "bilinear",
                  "resize_mode": "shortest"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}))
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder, reference, cfg


@pytest.mark.parametrize("trunk", ["fastvit_mci0_tinytest",
                                   pytest.param("fastvit_mci3_tinytest", marks=pytest.mark.slow)])
def test_a_small_fastvit_open_clip_folder_loads_with_auto_within_1e_4(tiny_trunks, monkeypatch, tmp_path, trunk):
    folder, reference, cfg = _open_clip_folder(monkeypatch, tmp_path, trunk)
    model, phi = load_model(folder, "auto")
    assert phi == "custom" and model.config == from_open_clip(cfg) and not model.config.text.causal
    assert model.preprocess.std == (1.0, 1.0, 1.0)
    assert set(model.state_dict()) == set(reference.state_dict())  # BatchNorm buffers included
    _assert_same_features(model.eval(), reference)
    other = open_clip.create_model(f"tiny-{trunk}", pretrained=None).eval()
    other.load_state_dict(model.state_dict(), strict=True)  # what this project saves is open_clip's
    _assert_same_features(model, other)


def _train_two_steps(model, freeze_bn_stats) -> None:
    from utils.train.distributed import DistInfo
    from utils.train.epoch import StopFlag, fit_one_epoch
    from utils.train.optim import build_optimizer, build_scheduler

    optimizer = build_optimizer(model, "adamw", 1e-3, 0.9, 0.0)
    scheduler = build_scheduler(optimizer, "cos", 10, 0, 1e-3, 1e-5)
    tokens = torch.zeros(2, 16, dtype=torch.long)
    tokens[:, 0], tokens[:, 1], tokens[:, 2] = 297, 5, 299
    g = torch.Generator().manual_seed(3)
    loader = [(torch.randn(2, 3, 64, 64, generator=g) + 1.0, tokens)] * 2  # off the statistics' init (0, 1)
    state = {"global_step": 0, "step": 0, "bad_steps": 0, "bad_in_a_row": 0, "run_start_step": 0,
             "epoch_loss_sum": 0.0, "epoch_loss_count": 0}
    cfg = {"Epoch": 1, "lock_image": False, "lock_text": False, "max_bad_steps": 3, "grad_clip": 0.0,
           "stop_after_steps": 0, "freeze_bn_stats": freeze_bn_stats, "model_path": "weights"}
    fit_one_epoch(model, lambda i, t, s: ((i * t).sum() * s), optimizer, scheduler,
                  torch.amp.GradScaler("cpu", enabled=False), loader, 1, 0, state, cfg, torch.device("cpu"), "fp32",
                  DistInfo(), StopFlag(), None)
    assert state["global_step"] == 2


# None: auto, frozen when fine-tuning from weights; False: the check that the statistics would move.
@pytest.mark.parametrize("freeze_bn_stats", [None, pytest.param(False, marks=pytest.mark.slow)])
def test_a_training_step_keeps_a_fastvit_towers_batch_norm_statistics_as_loaded(tiny_trunks, freeze_bn_stats):
    """freeze_bn_stats (auto: frozen when fine-tuning from weights, as for ResNet towers) holds every BatchNorm of a
    FastViT trunk; its gains and the rest of the tower still train. False lets the statistics move."""
    model = build_model(from_open_clip(_tiny_cfg("fastvit_mci0_tinytest")))
    norms = {n: m for n, m in model.visual.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert len(norms) > 10  # the trunk's convolutions are BatchNorm'd throughout
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_two_steps(model, freeze_bn_stats)
    after = model.state_dict()
    stats = [k for k in before if k.startswith("visual.") and k.endswith(("running_mean", "running_var"))]
    moved = [k for k in stats if not torch.equal(before[k], after[k])]
    if freeze_bn_stats is False:
        assert len(moved) == len(stats) > 0
    else:
        assert moved == []
    gains = [f"visual.{n}.weight" for n in norms]
    assert any(not torch.equal(before[k], after[k]) for k in gains)  # the BatchNorms' gains train either way


@pytest.mark.slow  # two exports, about a minute on 2 cores (as tests/test_onnx.py's)
def test_onnx_export_of_a_fastvit_mobileclip_equals_pytorch_within_1e_4(tiny_trunks, monkeypatch, tmp_path):
    """The FastViT image tower (BatchNorm in eval mode, RepMixer, attention) and the bidirectional text tower export;
    onnxruntime gives PyTorch's features, text padded to the full context as the weights read it."""
    import numpy as np

    from clip import CLIP
    from utils.export.onnx_export import export_files, write_files
    from utils.export.onnx_predict import OnnxCLIP

    folder, _, _ = _open_clip_folder(monkeypatch, tmp_path, "fastvit_mci0_tinytest", vocab_size=49408)  # real BPE
    model = CLIP(model_path=str(folder), phi="auto", cuda=False)
    lines = []
    files = export_files(model, log=lines.append)
    assert [line.split(":")[0] for line in lines] == ["image.onnx", "text.onnx"]
    assert all(float(line.split("= ")[1].split()[0]) < 1e-4 for line in lines), lines
    export = tmp_path / "export"
    export.mkdir()
    write_files(export, files)
    onnx = OnnxCLIP(export)
    captions = ["a dog", "a photo of a red car parked next to a tall building"]
    tokens = onnx.tokenize(captions)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        text, image = model.net.encode_text(torch.from_numpy(tokens)), model.net.encode_image(pixels)
    assert text.abs().max() > 1e-2 and image.abs().max() > 1e-2
    assert np.abs(onnx.encode_text(tokens) - text.numpy()).max() < 1e-4
    assert np.abs(onnx.encode_image(pixels.numpy()) - image.numpy()).max() < 1e-4
