"""open_clip's timm-tower families (nets/zoo_rows.py: ConvNeXt, ...) against open_clip 3.3: a row per architecture,
equal to what `from_open_clip` reads from its JSON and building open_clip's parameter names and shapes on the meta
device; small random-weight models within 1e-4 of open_clip's, state dicts loading strictly both ways, and an
open_clip hub folder loading with phi='auto'."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nets import build_model, get_config
from nets.configs import MODEL_CONFIGS, UnsupportedArchitectureError
from nets.shape_config import UnknownHeadsError, infer_config
from nets.open_clip_configs import from_open_clip
from nets.zoo_rows import CONVNEXT, EVA, MOBILECLIP, PE_CORE, VITAMIN
from tests.conftest import meta_models_with_open_clips_names_and_shapes
from tests.test_siglip_towers import _move_every_parameter
from utils.weights.load import load_model

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

CONFIG_DIR = Path(open_clip.__file__).parent / "model_configs"
FAMILIES = {"convnext": (CONVNEXT, ("convnext_",)), "eva": (EVA, ("EVA",)), "vitamin": (VITAMIN, ("ViTamin",)),
            "pe-core": (PE_CORE, ("PE-Core",)), "mobileclip": (MOBILECLIP, ("MobileCLIP-B", "MobileCLIP2-B"))}
OPEN_CLIP_ROWS = [m for m in open_clip.list_models() if m.startswith(sum((p for _, p in FAMILIES.values()), ()))]
# Names timm does not know, standing for small trunks of each family so that open_clip can build them too.
_SMALL_VIT = dict(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=2)
TINY_TRUNKS = {"convnext_tinytest": ("convnext_tiny", dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40))),
               "eva01_tinytest": ("eva_giant_patch14_224", dict(_SMALL_VIT, mlp_ratio=3.5)),
               "eva02_tinytest": ("eva02_base_patch16_clip_224", _SMALL_VIT),
               # These stems fix the width: one block keeps them small.
               "vitamin_tinytest": ("vitamin_small_224", dict(img_size=64, depth=1)),
               "pe_core_tinytest": ("vit_pe_core_tiny_patch16_384", dict(img_size=64, depth=2)),
               "mci_tinytest": ("vit_base_mci_224", dict(img_size=64, depth=1))}


def _open_clip_cfg(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def _tiny_cfg(trunk: str, **vision) -> dict:
    return dict(embed_dim=48, vision_cfg=dict(image_size=64, timm_model_name=trunk, timm_model_pretrained=False,
                                              timm_drop=0.0, timm_drop_path=0.1, **vision),
                text_cfg=dict(context_length=16, vocab_size=300, width=32, heads=2, layers=2))


@pytest.fixture
def tiny_open_clip(monkeypatch):
    """open_clip's `create_model` for tiny configs, registered for the test, with timm building TINY_TRUNKS."""
    real_create = timm.create_model

    def create(name, *args, **kwargs):
        if name in TINY_TRUNKS:
            real, overrides = TINY_TRUNKS[name]
            return real_create(real, *args, **{**kwargs, **overrides})
        return real_create(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)
    registry = open_clip.factory._MODEL_CONFIGS

    def build(name: str, cfg: dict):
        monkeypatch.setitem(registry, name, cfg)
        model = open_clip.create_model(name, pretrained=None).eval()
        _move_every_parameter(model, seed=1)
        return model

    return build


def _assert_same_features(model, reference, image_size: int = 64) -> None:
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(3, 3, image_size, image_size, generator=g)
    tokens = torch.randint(1, 298, (4, 16), generator=g)
    tokens[:, 0], tokens[1, 5], tokens[1, 6:] = 297, 299, 0  # BPE-like: EOT the largest id, zeros after it
    tokens[[0, 2, 3], -1] = 299
    with torch.no_grad():
        for ours, theirs in ((model.encode_image(pixels), reference.encode_image(pixels)),
                             (model.encode_text(tokens), reference.encode_text(tokens))):
            assert theirs.abs().max() > 1e-2  # features of moved weights, not zeros
            assert (ours - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("family, count", [("convnext", 11), ("eva", 7), ("vitamin", 15), ("pe-core", 5),
                                           ("mobileclip", 2)])
def test_the_table_has_a_row_for_every_architecture_of_the_family(family, count):
    rows, prefix = FAMILIES[family]
    names = [m for m in open_clip.list_models() if m.startswith(prefix)]
    assert len(names) == count and sorted(rows) == sorted(names)
    assert all(name in MODEL_CONFIGS for name in names)


# One row per family in the quick suite; the others (seconds each on the meta device) with the slow ones.
QUICK_ROWS = {"convnext_base", "EVA02-B-16", "ViTamin-S", "PE-Core-T-16-384", "MobileCLIP-B"}


@pytest.mark.parametrize("name", [n if n in QUICK_ROWS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in OPEN_CLIP_ROWS])
def test_each_row_is_open_clips_json_and_builds_its_names_and_shapes_on_the_meta_device(name):
    ours = get_config(name)
    assert asdict(ours) == asdict(from_open_clip(_open_clip_cfg(name)))
    meta_models_with_open_clips_names_and_shapes(name, ours)


@pytest.mark.parametrize("proj", ["linear", "mlp"])
def test_a_small_convnext_is_open_clips_within_1e_4_and_loads_both_ways(tiny_open_clip, proj):
    cfg = _tiny_cfg("convnext_tinytest", timm_pool="", timm_proj=proj)
    reference = tiny_open_clip(f"tiny-convnext-{proj}", cfg)
    model = build_model(from_open_clip(cfg)).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    _assert_same_features(model, reference)
    other = open_clip.create_model(f"tiny-convnext-{proj}", pretrained=None).eval()
    other.load_state_dict(model.state_dict(), strict=True)  # what this project saves is open_clip's
    _assert_same_features(model, other)


@pytest.mark.parametrize("trunk, pool, proj", [
    ("eva01_tinytest", "token", None), ("eva02_tinytest", "token", None),
    pytest.param("vitamin_tinytest", "", "linear", marks=pytest.mark.slow),  # its stem alone is 2.5M parameters
    ("pe_core_tinytest", "map", None), ("mci_tinytest", "token", None)])
def test_a_small_custom_text_trunk_is_open_clips_within_1e_4_and_loads_both_ways(tiny_open_clip, trunk, pool, proj):
    """EVA01, EVA02, ViTamin, PE-Core and MobileCLIP's ViT-B, each with open_clip's custom_text keys (`text.*`)."""
    cfg = {**_tiny_cfg(trunk, timm_pool=pool, timm_proj=proj), "custom_text": True}
    reference = tiny_open_clip(f"tiny-{trunk}", cfg)
    model = build_model(from_open_clip(cfg)).eval()
    assert model.config.text.kind == "openai-custom"
    model.load_state_dict(reference.state_dict(), strict=True)  # keys `text.*`, `visual.trunk.*`, `visual.head.*`
    assert set(model.state_dict()) == set(reference.state_dict())
    _assert_same_features(model, reference)
    other = open_clip.create_model(f"tiny-{trunk}", pretrained=None).eval()
    other.load_state_dict(model.state_dict(), strict=True)
    _assert_same_features(model, other)


def test_an_open_clip_hub_folder_of_a_convnext_loads_with_auto_within_1e_4(tiny_open_clip, tmp_path):
    cfg = _tiny_cfg("convnext_tinytest", timm_pool="", timm_proj="linear", timm_proj_bias=True)
    reference = tiny_open_clip("tiny-convnext-bias", cfg)
    folder = tmp_path / "convnext-tiny-test"
    folder.mkdir()
    preprocess = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}))
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, folder / "open_clip_model.safetensors")
    model, phi = load_model(folder, "auto")
    assert phi == "custom" and model.config == from_open_clip(cfg)
    assert model.visual.head.proj.bias is not None
    _assert_same_features(model.eval(), reference)


def test_timm_settings_not_built_here_are_refused_by_name():
    cfg = _open_clip_cfg("convnext_base")
    for part, key, value in (("vision_cfg", "timm_proj", "conv"), ("vision_cfg", "timm_pool", "median"),
                             ("vision_cfg", "patch_size", 16), ("text_cfg", "proj_bias", True),
                             ("text_cfg", "ls_init_value", 0.1), ("text_cfg", "hf_model_name", "roberta-base")):
        bad = json.loads(json.dumps(cfg))
        (bad[part] if part else bad)[key] = value
        with pytest.raises(UnsupportedArchitectureError, match=f"{part + '.' if part else ''}{key}=") as err:
            from_open_clip(bad)
        assert "\n" not in str(err.value)
    unknown = json.loads(json.dumps(cfg))
    unknown["vision_cfg"]["timm_model_name"] = "convnext_nowhere"
    with pytest.raises(UnsupportedArchitectureError, match="timm has no model 'convnext_nowhere'"):
        from_open_clip(unknown)


def test_a_convnext_rows_record_round_trips_through_json():
    from nets.configs import CLIPConfig

    config = get_config("convnext_large_d_320")
    assert CLIPConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.vision.timm_proj == "mlp" and config.vision.timm_kwargs == ()


@pytest.mark.parametrize("name", ["convnext_base", "EVA02-B-16"])
def test_a_bare_state_dict_of_these_towers_asks_for_its_config_in_one_line(name):
    with torch.device("meta"):
        state = build_model(get_config(name)).state_dict()
    with pytest.raises(UnknownHeadsError, match="open_clip_config.json beside it") as err:
        infer_config(state)
    assert "\n" not in str(err.value)
