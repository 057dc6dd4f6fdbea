"""SigLIP / SigLIP 2 in the model table and the loaders: a row per open_clip 3.3 architecture, equal to what
`from_open_clip` reads from its JSON and building open_clip's parameter names and shapes; a small one through
`build_model` within 1e-4 of open_clip with state dicts loading strictly both ways; an open_clip hub folder and this
project's own weight file loading with phi='auto'."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nets import build_model, configs, get_config
from nets.configs import MODEL_CONFIGS, UnsupportedArchitectureError, phi_of
from nets.shape_config import UnknownHeadsError, infer_config
from nets.open_clip_configs import from_open_clip
from tests.conftest import meta_models_with_open_clips_names_and_shapes
from tests.test_siglip_towers import _move_every_parameter, _tiny_open_clip_config, tiny_open_clip  # noqa: F401
from utils.weights.arch import save_weights
from utils.weights.load import load_model, preprocess_of

open_clip = pytest.importorskip("open_clip")

CONFIG_DIR = Path(open_clip.__file__).parent / "model_configs"
OPEN_CLIP_SIGLIPS = [m for m in open_clip.list_models() if "SigLIP" in m and not m.startswith("nllb")]


def _open_clip_cfg(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def test_the_table_has_a_row_for_every_siglip_architecture_of_open_clip():
    assert len(OPEN_CLIP_SIGLIPS) == 26
    assert sorted(configs.SIGLIP) == sorted(OPEN_CLIP_SIGLIPS)
    assert all(name in MODEL_CONFIGS for name in OPEN_CLIP_SIGLIPS)


@pytest.mark.parametrize("name", OPEN_CLIP_SIGLIPS)
def test_each_row_is_open_clips_json_and_builds_its_names_and_shapes_on_the_meta_device(name):
    ours = get_config(name)
    assert asdict(ours) == asdict(from_open_clip(_open_clip_cfg(name)))
    assert phi_of(ours) == name or get_config(phi_of(ours)) == ours  # a twin row (same network) may come first
    reference, model = meta_models_with_open_clips_names_and_shapes(name, ours)
    # A bare state dict (no config beside it) finds its row by its shapes alone, or names the rows it fits.
    if name.startswith("ViT-SO400M-14-SigLIP-3"):
        with pytest.raises(UnknownHeadsError, match="fit ViT-SO400M-14-SigLIP-378 and ViT-SO400M-14-SigLIP-384"):
            infer_config(reference.state_dict())
    else:
        assert infer_config(reference.state_dict()) == ours
    # Shapes do not show the head counts: the trunks' and the text tower's are open_clip's too.
    assert model.visual.trunk.blocks[0].attn.num_heads == reference.visual.trunk.blocks[0].attn.num_heads
    assert model.text.transformer.resblocks[0].attn.heads == reference.text.transformer.resblocks[0].attn.num_heads


def _tiny_pair(tiny_open_clip, siglip2: bool):
    torch.manual_seed(0)
    cfg = _tiny_open_clip_config(siglip2)
    reference = tiny_open_clip("tiny-siglip2-test" if siglip2 else "tiny-siglip-test", cfg)
    _move_every_parameter(reference, seed=1)
    return cfg, reference


def _inputs():
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    tokens = torch.randint(2, 300, (4, 16), generator=g)
    tokens[1, 5:] = 1
    return pixels, tokens


def _assert_same_features(model, reference) -> None:
    pixels, tokens = _inputs()
    with torch.no_grad():
        for ours, theirs in ((model.encode_image(pixels), reference.encode_image(pixels)),
                             (model.encode_text(tokens), reference.encode_text(tokens))):
            assert theirs.abs().max() > 1e-2
            assert (ours - theirs).abs().max() <= 1e-4
        images, texts, scale, bias = reference(pixels, tokens)
        a, b, s, c = model(pixels, tokens)
        assert (torch.sigmoid(model.logits(a, b)) - torch.sigmoid(scale * images @ texts.t() + bias)).abs().max() \
            <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("siglip2", [False, True], ids=["siglip", "siglip2"])
def test_a_small_siglip_through_build_model_is_open_clips_within_1e_4_and_loads_both_ways(tiny_open_clip, siglip2):
    cfg, reference = _tiny_pair(tiny_open_clip, siglip2)
    model = build_model(from_open_clip(cfg)).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    _assert_same_features(model, reference)
    # The project's state dict (what it saves) is open_clip's: it loads strictly there.
    other = open_clip.create_model("tiny-siglip2-test" if siglip2 else "tiny-siglip-test", pretrained=None).eval()
    other.load_state_dict(model.state_dict(), strict=True)
    _assert_same_features(model, other)
    assert model.dtype == torch.float32 and model.half().dtype == torch.float16  # the trunk's patch embedding


def test_a_bare_siglip_state_dict_resolves_with_auto_to_its_row_without_the_quickgelu_note():
    from utils.weights.load import Checkpoint, resolve

    with torch.device("meta"):
        state = build_model(get_config("ViT-B-16-SigLIP2")).state_dict()
    config, phi, notes = resolve(Checkpoint(state, "openai", Path("bare.safetensors")), "auto")
    assert (config, phi, notes) == (get_config("ViT-B-16-SigLIP2"), "ViT-B-16-SigLIP2", [])


def test_a_bare_siglip_state_dict_that_matches_no_row_is_refused_in_one_line(tiny_open_clip):
    _, reference = _tiny_pair(tiny_open_clip, siglip2=False)
    with pytest.raises(UnknownHeadsError, match="match no SigLIP row") as err:
        infer_config(reference.state_dict())
    assert "\n" not in str(err.value)


def test_settings_siglip_towers_do_not_build_are_refused_by_name():
    cfg = _open_clip_cfg("ViT-B-16-SigLIP")
    for part, key, value in (("vision_cfg", "timm_pool", "avg"), ("text_cfg", "pool_type", "argmax"),
                             ("text_cfg", "act_kwargs", {"approximate": "sigmoid"}), ("text_cfg", "qk_norm", True)):
        bad = json.loads(json.dumps(cfg))
        bad[part][key] = value
        with pytest.raises(UnsupportedArchitectureError, match=f"{part}.{key}="):
            from_open_clip(bad)
    missing = json.loads(json.dumps(cfg))
    del missing["text_cfg"]["no_causal_mask"]  # open_clip's default is causal
    with pytest.raises(UnsupportedArchitectureError, match="text_cfg.no_causal_mask unset"):
        from_open_clip(missing)
    unknown = json.loads(json.dumps(cfg))
    unknown["vision_cfg"]["timm_model_name"] = "vit_nowhere_siglip_224"
    with pytest.raises(UnsupportedArchitectureError, match="timm has no model 'vit_nowhere_siglip_224'"):
        from_open_clip(unknown)


def _hub_folder(tmp_path: Path, cfg: dict, reference) -> Path:
    folder = tmp_path / "ViT-tiny-SigLIP"
    folder.mkdir()
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                  "resize_mode": "squash"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}))
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder


@pytest.mark.slow
def test_an_open_clip_hub_folder_of_a_siglip_loads_with_auto_and_by_name_within_1e_4(tiny_open_clip, tmp_path,
                                                                                    monkeypatch):
    cfg, reference = _tiny_pair(tiny_open_clip, siglip2=True)
    folder = _hub_folder(tmp_path, cfg, reference)
    theirs, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    theirs.eval()
    model, phi = load_model(folder, "auto")
    assert phi == "custom"  # a scaled-down trunk: no row of the table
    assert model.config == from_open_clip(cfg) and model.logit_bias.item() == reference.logit_bias.item()
    _assert_same_features(model.eval(), theirs)
    normalize = transform.transforms[-1]
    record = preprocess_of(model)
    assert record.mean == tuple(normalize.mean) == (0.5, 0.5, 0.5) and record.std == tuple(normalize.std)
    # By name: a row with this architecture (planted; the table's rows are full size) loads the folder as it is.
    monkeypatch.setitem(MODEL_CONFIGS, "tiny-siglip2", from_open_clip(cfg).to_dict())
    named, phi = load_model(folder, "tiny-siglip2")
    assert phi == "tiny-siglip2" and load_model(folder, "auto")[1] == "tiny-siglip2"
    _assert_same_features(named.eval(), theirs)
    # The project's weight file records the architecture beside it, and loads back with auto.
    path = tmp_path / "siglip.pth"
    save_weights(model.state_dict(), path, model.config, phi, record)
    again, _ = load_model(path, "auto")
    assert again.config == model.config and preprocess_of(again) == record
    _assert_same_features(again.eval(), theirs)


def test_a_siglip_rows_record_round_trips_through_json():
    config = get_config("ViT-SO400M-16-SigLIP-i18n-256")
    back = configs.CLIPConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config and not back.text.projection and back.init_logit_bias == -10.0
    assert replace(config.text, eps=1e-5) != config.text  # eps is part of the network, not decoration
