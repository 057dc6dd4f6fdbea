"""The table against open_clip 3.3 (a test reference): its JSON configs, its features, its parameter shapes."""
from __future__ import annotations

import json

import pytest
import torch

from nets import build_model, get_config
from nets.configs import MODEL_CONFIGS, OPEN_CLIP_VITS, with_activation
from nets.open_clip_configs import from_open_clip, unsupported_open_clip_settings
from tests.conftest import random_tokens
from utils.errors import UserError
from utils.weights.arch import save_weights
from utils.weights.load import load_model, read_checkpoint, resolve

open_clip = pytest.importorskip("open_clip")

QUICKGELU = "-quickgelu"
OPEN_CLIP_NAMES = [f"{name}{suffix}" for name in OPEN_CLIP_VITS for suffix in ("", QUICKGELU)]


def _open_clip_json(name: str) -> dict:
    """open_clip's model_cfg for `name`; `<name>-quickgelu` without a JSON of its own is force_quick_gelu's."""
    cfg = open_clip.get_model_config(name)
    if cfg is None and name.endswith(QUICKGELU):
        cfg = {**open_clip.get_model_config(name[:-len(QUICKGELU)]), "quick_gelu": True}
    assert cfg is not None, f"open_clip has no config {name}"
    return cfg


def test_every_open_clip_name_has_open_clip_json_sizes_heads_and_activation():
    for name in OPEN_CLIP_NAMES:
        cfg, config = _open_clip_json(name), get_config(name)
        v, t = cfg["vision_cfg"], cfg["text_cfg"]
        vision, text = config.vision, config.text
        # open_clip's dataclass defaults stand for what the JSON leaves out.
        assert (vision.image_size, vision.patch_size, vision.width, vision.layers) == \
            (v["image_size"], v["patch_size"], v["width"], v["layers"]), name
        assert vision.width // vision.heads == v.get("head_width", 64) and vision.width % vision.heads == 0, name
        assert vision.mlp_ratio == v.get("mlp_ratio", 4.0), name
        assert vision.mlp_width == int(v["width"] * v.get("mlp_ratio", 4.0)), name
        assert (text.kind, text.width, text.heads, text.layers) == ("openai", t["width"], t["heads"], t["layers"]), name
        assert (text.context_length, text.vocab_size) == (t.get("context_length", 77), t.get("vocab_size", 49408))
        assert text.mlp_ratio == t.get("mlp_ratio", 4.0) and config.embed_dim == cfg["embed_dim"], name
        activation = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
        assert vision.activation == text.activation == activation, name


def test_the_table_holds_every_open_clip_config_the_towers_build_exactly():
    buildable = {name for name in open_clip.list_models() if not unsupported_open_clip_settings(_open_clip_json(name))}
    assert buildable <= set(MODEL_CONFIGS)
    assert {"ViT-B-32", "ViT-H-14-378-quickgelu", "ViT-bigG-14", "ViT-L-14-336-quickgelu", "RN50",
            "RN50x64-quickgelu"} <= buildable
    for name in buildable:  # the table's rows are what from_open_clip makes of open_clip's JSON
        assert get_config(name) == from_open_clip(_open_clip_json(name)), name
    # Refused for a reason the towers here cannot follow exactly, each named:
    why = {name: unsupported_open_clip_settings(_open_clip_json(name)) for name in
           ("ViT-M-16-alt", "ViT-B-16-SigLIP", "EVA02-B-16", "coca_ViT-B-32",
            "xlm-roberta-base-ViT-B-32", "ViT-L-14-worldwide")}
    assert why["ViT-M-16-alt"] == ["vision_cfg.ls_init_value=0.0001"]
    assert any(w.startswith("vision_cfg.timm_model_name") for w in why["EVA02-B-16"])
    assert any(w.startswith("vision_cfg.attentional_pool") for w in why["coca_ViT-B-32"])
    assert any(w.startswith("text_cfg.hf_model_name") for w in why["xlm-roberta-base-ViT-B-32"])
    assert any(w.startswith("tokenizer 'google/mt5-base'") for w in why["ViT-L-14-worldwide"])
    assert all(why.values())


def _open_clip_model(model_cfg: dict):
    """open_clip's CLIP for `model_cfg`, with seeded random weights in every parameter (norms and biases too)."""
    with torch.device("meta"):
        model = open_clip.model.CLIP(**model_cfg)
    model.to_empty(device="cpu")  # skips open_clip's init: the weights are drawn below, once
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # 1/sqrt(fan-in) keeps activations near 1, where GELU and QuickGELU differ most.
            p.normal_(0, p[0].numel() ** -0.5 if p.ndim > 1 else 0.1, generator=g)
            if p.ndim == 1 and name.endswith("weight"):
                p.add_(1)  # LayerNorm gains near 1
        model.logit_scale.fill_(4.6)
    n = model.context_length
    model.attn_mask = torch.full((n, n), float("-inf")).triu_(1)  # a non-persistent buffer to_empty left blank
    return model.eval()


def _ours_with_weights_of(reference, config):
    with torch.device("meta"):  # no init of our own: every tensor comes from the reference
        model = build_model(config)
    model.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return model.eval()


# Small configs in open_clip's own JSON form: head width != 64, MLP ratios open_clip truncates, both activations.
SMALL_OPEN_CLIP = {
    "gelu-head32-mlp2.5": dict(embed_dim=40, vision_cfg=dict(image_size=32, patch_size=8, width=96, layers=2,
                                                             head_width=32, mlp_ratio=2.5),
                               text_cfg=dict(context_length=77, vocab_size=1000, width=64, heads=2, layers=2,
                                             mlp_ratio=3.3)),
    "quickgelu-head48-mlp4.3637": dict(embed_dim=40, quick_gelu=True,
                                       vision_cfg=dict(image_size=48, patch_size=16, width=144, layers=2,
                                                       head_width=48, mlp_ratio=4.3637),
                                       text_cfg=dict(context_length=77, vocab_size=1000, width=80, heads=5,
                                                     layers=2, mlp_ratio=4.9231)),
}


def _features(model, config, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, 3, config.vision.image_size, config.vision.image_size, generator=g)
    tokens = random_tokens(2, config.text.vocab_size, seed=seed, max_len=12)
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(tokens)


@pytest.mark.parametrize("name, heads, mlp_widths", [("gelu-head32-mlp2.5", 3, (240, 211)),
                                                      ("quickgelu-head48-mlp4.3637", 3, (628, 393))])
def test_small_custom_configs_match_open_clip_within_1e_4(name, heads, mlp_widths):
    reference = _open_clip_model(SMALL_OPEN_CLIP[name])
    config = from_open_clip(SMALL_OPEN_CLIP[name])
    assert config.vision.heads == heads and (config.vision.mlp_width, config.text.mlp_width) == mlp_widths
    ours = _ours_with_weights_of(reference, config)
    for a, b in zip(_features(ours, config), _features(reference, config)):
        assert (a - b).abs().max() < 1e-4
    # The activation is what separates them: the other one is far off.
    other = "gelu" if config.vision.activation == "quick_gelu" else "quick_gelu"
    wrong = _ours_with_weights_of(reference, with_activation(config, other))
    assert (_features(wrong, config)[0] - _features(reference, config)[0]).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-32-quickgelu", "ViT-B-16-plus-240"])
def test_open_clip_models_match_within_1e_4(name):
    reference = _open_clip_model(_open_clip_json(name))
    config = get_config(name)
    ours = _ours_with_weights_of(reference, config)
    for a, b in zip(_features(ours, config), _features(reference, config)):
        assert (a - b).abs().max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-H-14", "ViT-H-14-378-quickgelu", "ViT-H-16", "ViT-g-14", "ViT-bigG-14",
                                  "ViT-e-14", "ViT-L-14-336"])
def test_big_models_have_open_clip_parameter_names_and_shapes(name):
    with torch.device("meta"):  # shapes only: nothing is allocated
        theirs = open_clip.create_model(name, device="meta").state_dict()
        ours = build_model(get_config(name)).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.slow
def test_laion_style_gelu_vit_b_32_file_loads_by_name_within_1e_4_and_auto_names_that_phi(tmp_path):
    # LAION's, DataComp's and most open_clip weights: OpenAI's keys and shapes, exact GELU.
    reference = _open_clip_model(_open_clip_json("ViT-B-32"))
    path = tmp_path / "laion.pth"
    torch.save(reference.state_dict(), path)
    checkpoint = read_checkpoint(path)
    config, phi, notes = resolve(checkpoint, "auto")  # a bare state dict cannot show its activation
    assert phi == "openai/VIT-B-32" and len(notes) == 1 and "phi='ViT-B-32'" in notes[0]
    model, phi = load_model(path, "ViT-B-32")
    assert phi == "ViT-B-32" and model.config.vision.activation == "gelu"
    for a, b in zip(_features(model.eval(), model.config), _features(reference, model.config)):
        assert (a - b).abs().max() < 1e-4


def test_weight_files_saved_here_load_strictly_with_open_clips_load_checkpoint(tmp_path):
    cfg = SMALL_OPEN_CLIP["gelu-head32-mlp2.5"]
    config = from_open_clip(cfg)
    torch.manual_seed(0)
    ours = build_model(config).eval()
    save_weights(ours.state_dict(), tmp_path / "last_epoch_weights.pth", config, "custom")
    theirs = open_clip.model.CLIP(**cfg).eval()
    assert not open_clip.load_checkpoint(theirs, str(tmp_path / "last_epoch_weights.pth"), strict=True).missing_keys
    for a, b in zip(_features(ours, config), _features(theirs, config)):
        assert (a - b).abs().max() < 1e-4


def test_open_clip_hub_folder_loads_with_auto_from_its_config_within_1e_4(tmp_path):
    cfg = SMALL_OPEN_CLIP["quickgelu-head48-mlp4.3637"]
    reference = _open_clip_model(cfg)
    folder = tmp_path / "hub"
    folder.mkdir()
    # The layout open_clip's push_to_hub writes and hf-hub: names load.
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.save(reference.state_dict(), folder / "open_clip_pytorch_model.bin")
    for path in (folder, folder / "open_clip_pytorch_model.bin"):
        model, phi = load_model(path, "auto")
        assert phi == "custom" and model.config == from_open_clip(cfg)
        for a, b in zip(_features(model.eval(), model.config), _features(reference, model.config)):
            assert (a - b).abs().max() < 1e-4
    layer_scale = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "ls_init_value": 1e-5}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": layer_scale}))
    with pytest.raises(UserError, match="open_clip_config.json: open_clip config sets vision_cfg.ls_init_value"):
        load_model(folder, "auto")
