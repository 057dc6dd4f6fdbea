"""transformers' SiglipModel folders (utils/weights/layouts.py, folders.py) against transformers itself: small
random-weight models saved with `save_pretrained` and a tokenizer, loaded through `CLIP(model_path=folder,
phi='auto')`, give `get_image_features` / `get_text_features` within 1e-4 on real photos through each side's own
preprocessing; the same weights in open_clip's layout give the same features (and open_clip's own); hub repos,
NaFlex refusals, the offline tag, and export_hf's SiglipModel round trip."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_download import env  # noqa: F401
from tests.test_siglip_tokenizer import write_tokenizer
from tests.test_siglip_towers import _tiny_open_clip_config, tiny_open_clip  # noqa: F401
from utils.errors import UserError
from utils.tokenizer import canonicalize

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

CAPTIONS = ["a photo of a cat", "Two birds!", "a dog running fast on the beach", "",
            "a very long caption about pictures of animals and people " * 3]
# (vision hidden_act, text hidden_act): open_clip's SigLIP rows (exact GELU), its SigLIP 2 rows (tanh text), and
# what the hub's SiglipModel folders say (tanh in both towers, as big_vision trained them).
ACTIVATIONS = {"siglip": ("gelu", "gelu"), "siglip2": ("gelu", "gelu_pytorch_tanh"),
               "hub": ("gelu_pytorch_tanh", "gelu_pytorch_tanh")}


def _photos():
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(a) for a in load_sample_images().images]


def tiny_siglip(kind: str) -> "transformers.SiglipModel":
    """A SiglipModel with the sizes of tests/test_siglip_towers.py's tiny open_clip configs, every parameter moved
    off its init (LayerNorm gains, biases, the pool's probe, the scale and bias too)."""
    vision_act, text_act = ACTIVATIONS[kind]
    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, hidden_act=text_act, pad_token_id=0,
                         bos_token_id=None, eos_token_id=1),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act=vision_act))
    torch.manual_seed(0)
    model = transformers.SiglipModel(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-1.5)
    return model


def save_siglip_folder(model, folder: Path, tokenizer: bool = True) -> Path:
    """The folder `save_pretrained` writes, with SiglipImageProcessor's config and the tokenizer files."""
    model.save_pretrained(folder)
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    if tokenizer:
        write_tokenizer(folder)
    return folder


def _hf_features(model, folder: Path, images, tokens):
    processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(input_ids=tokens)
    # transformers 5 returns the pooled output object; 4.x the tensor
    image, text = (getattr(x, "pooler_output", x) for x in (image, text))
    return image, text


def _ours(clip, images):
    image, text = clip.detect_image_for_eval(images, CAPTIONS)
    return image.float(), text.float(), clip.tokenize(CAPTIONS)


def _assert_close(ours, theirs, what: str, tol: float = 1e-4) -> float:
    assert ours.shape == theirs.shape, what
    assert theirs.abs().max() > 1e-2, f"{what}: features of moved weights, not zeros"
    worst = (ours - theirs).abs().max().item()
    assert worst <= tol, f"{what}: {worst:.2e}"
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(ACTIVATIONS))
def test_a_transformers_siglip_folder_loads_with_auto_and_gives_its_features_within_1e_4(tmp_path, kind):
    from clip import CLIP

    hf = tiny_siglip(kind)
    folder = save_siglip_folder(hf, tmp_path / "siglip")
    clip = CLIP(model_path=str(folder), phi="auto", cuda=False, precision="fp32")
    assert clip.net.config.vision.activation == ("gelu_tanh" if kind == "hub" else "gelu")
    assert clip.net.logit_bias.item() == pytest.approx(-1.5) and clip.net.logit_scale.item() == pytest.approx(
        math.log(10.0))
    photos = _photos()
    image, text, tokens = _ours(clip, photos)
    assert (tokens == clip.tokenizer.pad_token_id).any() and tokens.shape == (len(CAPTIONS), 16)
    theirs_image, theirs_text = _hf_features(hf, folder, photos, tokens)
    _assert_close(image, theirs_image, "image features")
    _assert_close(text, theirs_text, "text features")
    # transformers' own tokenizer of the folder, padded as SigLIP was trained, gives the ids the model saw.
    hf_tokens = transformers.AutoTokenizer.from_pretrained(folder)(
        [canonicalize(c) for c in CAPTIONS], padding="max_length", max_length=16, truncation=True,
        return_tensors="pt")["input_ids"]
    assert (hf_tokens == tokens).all()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["siglip", "siglip2"])
def test_open_clip_layout_and_transformers_layout_of_the_same_weights_give_the_same_features(tmp_path, kind,
                                                                                           tiny_open_clip):
    from safetensors.torch import save_file

    from clip import CLIP
    from utils.weights.layouts import open_clip_to_siglip, siglip_to_open_clip

    hf = tiny_siglip(kind)
    folder = save_siglip_folder(hf, tmp_path / "hf")
    state = siglip_to_open_clip(hf.state_dict())
    cfg = _tiny_open_clip_config(kind == "siglip2")
    reference = tiny_open_clip(f"tiny-{kind}-hf-test", cfg)
    reference.load_state_dict(state, strict=True)  # transformers' keys mapped onto open_clip's, every one
    assert open_clip_to_siglip(state).keys() == hf.state_dict().keys()
    assert all((open_clip_to_siglip(state)[k] == v).all() for k, v in hf.state_dict().items())
    oc = tmp_path / "open_clip"
    oc.mkdir()
    (oc / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {
        "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"}}))  # SiglipImageProcessor's
    save_file({k: v.contiguous() for k, v in state.items()}, oc / "open_clip_model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the same files (training one again may differ)
        (oc / name).write_bytes((folder / name).read_bytes())
    photos = _photos()
    from_hf = _ours(CLIP(model_path=str(folder), phi="auto", cuda=False, precision="fp32"), photos)
    from_oc = _ours(CLIP(model_path=str(oc), phi="auto", cuda=False, precision="fp32"), photos)
    assert (from_hf[2] == from_oc[2]).all()
    _assert_close(from_hf[0], from_oc[0], "image features, two layouts", 1e-5)
    _assert_close(from_hf[1], from_oc[1], "text features, two layouts", 1e-5)
    with torch.no_grad():  # open_clip itself on the mapped weights: transformers' features
        theirs_image, theirs_text = _hf_features(hf, folder, photos, from_hf[2])
        pixels = CLIP(model_path=str(oc), phi="auto", cuda=False, precision="fp32").preprocess(photos)
        _assert_close(reference.encode_image(pixels), theirs_image, "open_clip image features")
        _assert_close(reference.encode_text(from_hf[2]), theirs_text, "open_clip text features")


def test_a_siglip_folder_without_tokenizer_files_names_them_in_one_line(tmp_path):
    from clip import CLIP

    folder = save_siglip_folder(tiny_siglip("hub"), tmp_path / "siglip", tokenizer=False)
    with pytest.raises(UserError) as err:
        CLIP(model_path=str(folder), phi="auto", cuda=False)
    message = str(err.value)
    assert "\n" not in message and str(folder) in message
    assert all(name in message for name in ("tokenizer.json", "spiece.model"))


def test_a_naflex_siglip2_folder_is_refused_in_one_line_saying_what_is_unsupported(tmp_path):
    from utils.weights.load import load_model

    config = transformers.Siglip2Config(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=224, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                           patch_size=8, num_patches=16))
    transformers.Siglip2Model(config).save_pretrained(tmp_path / "naflex")
    with pytest.raises(UserError) as err:
        load_model(tmp_path / "naflex", "auto")
    message = str(err.value)
    assert "\n" not in message and "NaFlex" in message and "own resolution" in message
    assert "model_type 'siglip'" in message  # what loads instead


def test_siglip_configs_that_the_towers_do_not_build_are_refused_by_name():
    from nets.configs import UnsupportedArchitectureError
    from utils.weights.layouts import config_from_transformers

    base = tiny_siglip("hub").config.to_dict()
    for part, key, value, says in (("vision_config", "hidden_act", "relu", "vision_config.hidden_act"),
                                   ("text_config", "hidden_act", "silu", "text_config.hidden_act"),
                                   ("vision_config", "vision_use_head", False, "vision_use_head"),
                                   ("vision_config", "layer_norm_eps", 1e-5, "layer_norm_eps"),
                                   ("text_config", "projection_size", 32, "projection_size")):
        bad = json.loads(json.dumps(base))
        bad[part][key] = value
        with pytest.raises(UnsupportedArchitectureError, match=says):
            config_from_transformers(bad)


def test_a_full_size_hub_config_is_its_row_on_the_meta_device():
    """google/siglip2-base-patch16-224's config.json (fixed resolution: model_type siglip), read as a row: the
    names and shapes of transformers' model map onto the row's strictly, nothing allocated."""
    from nets.clip import build_model
    from nets.configs import get_config
    from utils.weights.layouts import config_from_transformers, siglip_to_open_clip

    hub = {"model_type": "siglip", "text_config": {"vocab_size": 256000, "hidden_size": 768,
                                                   "intermediate_size": 3072, "num_hidden_layers": 12,
                                                   "num_attention_heads": 12, "max_position_embeddings": 64,
                                                   "hidden_act": "gelu_pytorch_tanh", "projection_size": 768},
           "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                             "num_attention_heads": 12, "image_size": 224, "patch_size": 16,
                             "hidden_act": "gelu_pytorch_tanh"}}
    config = config_from_transformers(hub)
    row = get_config("ViT-B-16-SigLIP2")
    assert config.vision.timm_model_name == row.vision.timm_model_name
    # The row's network but for the vision activation, which the hub's folders say is tanh GELU.
    from dataclasses import replace
    assert replace(config, vision=replace(config.vision, activation="gelu")) == row
    with torch.device("meta"):
        theirs = transformers.SiglipModel(transformers.SiglipConfig.from_dict(hub)).state_dict()
        ours = build_model(config).state_dict()
    mapped = {k: tuple(v.shape) for k, v in siglip_to_open_clip(theirs).items()}
    assert mapped == {k: tuple(v.shape) for k, v in ours.items()}


@pytest.mark.slow
def test_a_transformers_siglip_hub_repo_loads_with_its_tokenizer_and_again_without_the_server(env, monkeypatch,
                                                                                             tmp_path):
    from safetensors.torch import save

    from clip import CLIP
    from tests.test_download import _hub_files, serve

    hf = tiny_siglip("hub")
    local = save_siglip_folder(hf, tmp_path / "local")
    files = _hub_files("google/siglip-tiny", {p.name: p.read_bytes() for p in local.iterdir()})
    photos = _photos()
    with serve(files) as (server, base):
        monkeypatch.setenv("HF_ENDPOINT", base)
        model = CLIP(model_path="hf-hub:google/siglip-tiny", phi="auto", cuda=False, precision="fp32")
        asked = {r.rsplit("/", 1)[-1] for r in server.requests}
        assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= asked
    image, text, tokens = _ours(model, photos)
    theirs_image, theirs_text = _hf_features(hf, local, photos, tokens)
    _assert_close(image, theirs_image, "image features")
    _assert_close(text, theirs_text, "text features")
    again = CLIP(model_path="hf-hub:google/siglip-tiny", phi="auto", cuda=False)  # the server is gone
    assert (again.tokenize(CAPTIONS) == tokens).all()


def test_a_siglip_tag_with_no_network_and_no_cache_is_one_line_and_exit_2(tmp_path):
    """A new interpreter, as a user runs it: huggingface_hub reads HF_HOME when it is imported."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "CLIP_CACHE": str(tmp_path / "c"),
           "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None), env.pop("HF_ENDPOINT", None)
    result = subprocess.run([sys.executable, "predict.py", "--phi", "ViT-B-16-SigLIP2", "--model_path", "webli",
                             "--image", "img/example.jpg", "--captions", "a dog"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "ViT-B-16-SigLIP2 webli" in lines[0] and "HF_HUB_OFFLINE is set" in lines[0], lines[0]
    assert not any((tmp_path / "hf").rglob("*.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["siglip2", "hub"])
def test_export_hf_writes_a_siglip_folder_that_transformers_loads_with_our_features(tmp_path, kind, capsys):
    from clip import CLIP
    from tests.conftest import run_script

    hf = tiny_siglip(kind)
    source = save_siglip_folder(hf, tmp_path / "source")
    out = tmp_path / "export"
    code, stdout, err = run_script("predict.py", "--mode", "export_hf", "--model_path", source, "--phi", "auto",
                                   "--export_dir", out, capsys=capsys)
    assert code == 0, err
    worst = float(stdout.split("text features ")[1].split()[0].rstrip(","))
    assert "SiglipModel.from_pretrained" in stdout and worst <= 1e-4, stdout
    back = transformers.SiglipModel.from_pretrained(out).eval()
    # The weights go back exactly: transformers' names and values are the source folder's.
    assert back.state_dict().keys() == hf.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in hf.state_dict().items())
    assert json.loads((out / "preprocessor_config.json").read_text())["image_processor_type"] == \
        "SiglipImageProcessor"
    processor = transformers.SiglipProcessor.from_pretrained(out, backend="pil")
    ours = CLIP(model_path=str(source), phi="auto", cuda=False, precision="fp32")
    photos = _photos()
    captions = ["a photo of a cat", "two birds", "a dog running fast on the beach"]
    inputs = processor(text=captions, images=photos, padding="max_length", max_length=16, truncation=True,
                       return_tensors="pt")
    assert (inputs["input_ids"] == ours.tokenize(captions)).all()
    with torch.no_grad():
        theirs = back(**inputs)
    image, text = ours.detect_image_for_eval(photos, captions)
    _assert_close(torch.nn.functional.normalize(image, dim=-1), theirs.image_embeds, "exported image features")
    _assert_close(torch.nn.functional.normalize(text, dim=-1), theirs.text_embeds, "exported text features")
    probs = np.concatenate([ours.detect_image(p, captions) for p in photos])
    assert np.abs(theirs.logits_per_image.sigmoid().numpy() - probs).max() <= 1e-4
    # The export reads back with phi='auto' as the same network.
    assert CLIP(model_path=str(out), phi="auto", cuda=False).net.config == ours.net.config


def test_export_hf_still_refuses_a_clip_with_a_logit_bias_and_mixed_towers():
    from dataclasses import replace

    from nets.configs import get_config
    from utils.export.hf import refusal

    assert refusal(get_config("ViT-B-16-SigLIP2")) is None and refusal(get_config("ViT-SO400M-16-SigLIP-i18n-256")) \
        is None
    assert "logit_bias" in refusal(replace(get_config("ViT-B-32"), init_logit_bias=-10.0))
    siglip, clip = get_config("ViT-B-16-SigLIP"), get_config("ViT-B-32")
    assert "SiglipModel" in refusal(replace(siglip, text=clip.text))


def test_naming_a_row_whose_activations_the_folder_contradicts_is_refused_in_one_line(tmp_path, monkeypatch):
    from dataclasses import replace

    from nets.configs import MODEL_CONFIGS
    from utils.weights.load import load_model, read_checkpoint

    folder = save_siglip_folder(tiny_siglip("hub"), tmp_path / "siglip")
    recorded = read_checkpoint(folder).config
    # A row with this folder's sizes but open_clip's exact GELU image tower.
    monkeypatch.setitem(MODEL_CONFIGS, "tiny-siglip-row", replace(recorded, vision=replace(
        recorded.vision, activation="gelu")).to_dict())
    with pytest.raises(UserError) as err:
        load_model(folder, "tiny-siglip-row")
    assert "\n" not in str(err.value) and "phi='auto'" in str(err.value) and "activation" in str(err.value)
    model, phi = load_model(folder, "auto")
    assert phi == "custom" and model.config.vision.activation == "gelu_tanh"


@pytest.mark.slow
def test_every_siglip_row_exports_onto_siglipmodels_names_and_shapes_and_reads_back_as_itself():
    """All 26 rows on the meta device (nothing allocated): the export's state dict is transformers' SiglipModel's
    for the config it writes, and that config reads back as the row's network (up to transformers' names)."""
    from dataclasses import replace

    from nets.clip import build_model
    from nets.configs import SIGLIP, phi_of, same_architecture
    from tests.conftest import no_init
    from utils.weights.layouts import (config_from_transformers, open_clip_to_siglip, siglip_head,
                                       siglip_transformers_config)

    for phi, row in SIGLIP.items():
        hf_config = siglip_transformers_config(row, pad_token_id=0, eos_token_id=1)
        with no_init(), torch.device("meta"):
            ours = open_clip_to_siglip(siglip_head(build_model(row).state_dict(), row))
            theirs = transformers.SiglipModel(hf_config).state_dict()
        assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}, phi
        back = config_from_transformers(json.loads(hf_config.to_json_string()))
        # The i18n SO400M's missing projection is written as an identity head with a zero bias.
        expected = row if row.text.projection else replace(row, text=replace(row.text, proj_bias=True,
                                                                               projection=True))
        assert same_architecture(back, expected) and phi_of(back) == (phi if row.text.projection else None), phi
