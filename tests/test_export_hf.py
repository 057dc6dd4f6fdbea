"""predict.py --mode export_hf, checked by transformers' own processor and model, and the open_clip route.

Exactness claims, with their tolerances: transformers' probabilities (CLIPProcessor + CLIPModel, its default
torchvision image backend) within 1e-3 of `CLIP.detect_image`; its image and text features within 1e-4 of ours
(PIL backend, which resizes as torchvision's PIL path does; the default backend rounds some pixels one step
differently); token ids equal ours up to EOT; the export read back with phi="auto" gives equal tensors; open_clip
loading this project's weight file gives our features within 1e-4.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from torch import nn

from clip import CLIP
from nets import VisionConfig, build_model, get_config
from nets.configs import MODEL_CONFIGS
from tests.conftest import run_script
from utils.errors import UserError
from utils.export import hf as export_hf
from utils.weights.load import load_model

ROOT = Path(__file__).resolve().parents[1]
# Not square, so the processor's resize and crop both act (170 -> 64 short side, then 84 -> 64 wide).
IMAGE = Image.open(ROOT / "img" / "example.jpg").convert("RGB").crop((0, 0, 224, 170))
CAPTIONS = {"openai": ["a photo of a dog", "A  Red CIRCLE, and a blue square!!", "it's 2 o'clock"],
            "bert": ["一只狗的照片", "一个红色的圆和一个蓝色的正方形", "两点钟"]}
HAS_ACTIVATION = "activation" in {f.name for f in dataclasses.fields(VisionConfig)}


def _perturbed(config) -> dict[str, torch.Tensor]:
    """Seeded weights with gains and biases off their 1/0 init (a swapped LayerNorm or bias shows) and OpenAI's
    trained temperature (100), so the probabilities are far from uniform."""
    torch.manual_seed(0)
    model = build_model(config)
    for p in model.parameters():
        if p.dim() == 1:
            nn.init.normal_(p, mean=float(p.detach().mean()), std=0.05)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100))
    return model.state_dict()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{phi: (weight file, export folder)}: each phi exported once through predict.py, on demand."""
    done = {}

    def export(phi: str) -> tuple[Path, Path]:
        if phi not in done:
            root = tmp_path_factory.mktemp("export")
            weights, folder = root / "weights.pth", root / "hf"
            torch.save(_perturbed(get_config(phi)), weights)
            result = run_script("predict.py", "--mode", "export_hf", "--model_path", weights, "--phi", phi,
                                "--export_dir", folder)
            assert result.returncode == 0, result.stderr
            assert "transformers vs this model" in result.stdout
            assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
            done[phi] = weights, folder
        return done[phi]

    return export


def _classes(chinese: bool):
    if chinese:
        return transformers.ChineseCLIPModel, transformers.ChineseCLIPProcessor
    return transformers.CLIPModel, transformers.CLIPProcessor


def _check_parity(folder: Path, ours: CLIP) -> None:
    chinese = ours.net.config.text.is_bert
    model_class, processor_class = _classes(chinese)
    hf = model_class.from_pretrained(folder).eval()
    captions = CAPTIONS["bert" if chinese else "openai"]
    expected = torch.from_numpy(ours.detect_image(IMAGE, captions))
    assert expected.max() - expected.min() > 0.05  # far enough from uniform to tell a wrong model
    default = processor_class.from_pretrained(folder)
    with torch.no_grad():
        probabilities = hf(**default(text=captions, images=IMAGE, return_tensors="pt", padding=True)
                           ).logits_per_image.softmax(-1)
    assert (probabilities - expected).abs().max() < 1e-3

    pil = processor_class.from_pretrained(folder, backend="pil")
    inputs = pil(text=captions, images=IMAGE, return_tensors="pt", padding=True)
    image_features, text_features = ours.detect_image_for_eval([IMAGE], captions)
    with torch.no_grad():
        hf_image = hf.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        hf_text = hf.get_text_features(**{k: v for k, v in inputs.items() if k != "pixel_values"}).pooler_output
    assert (hf_image - image_features).abs().max() < 1e-4
    assert (hf_text - text_features).abs().max() < 1e-4
    # Token ids: ours pad with 0 and transformers' CLIPTokenizer with EOT, which the tower never reads past.
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    assert torch.equal(ids[mask], ours.tokenize(captions)[:, :ids.shape[1]][mask])


@pytest.mark.slow
def test_clip_export_matches_transformers_probabilities_1e3_features_1e4(exported):
    weights, folder = exported("tiny/VIT-T-8")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["CLIPModel"]
    assert config["vision_config"]["hidden_act"] == config["text_config"]["hidden_act"] == "quick_gelu"
    assert config["logit_scale_init_value"] == pytest.approx(math.log(100))
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "vocab.json", "merges.txt",
                                                  "tokenizer_config.json", "special_tokens_map.json",
                                                  "preprocessor_config.json"}
    _check_parity(folder, CLIP(model_path=str(weights), phi="tiny/VIT-T-8", cuda=False, precision="fp32"))


@pytest.mark.slow
def test_chinese_clip_export_matches_transformers_probabilities_1e3_features_1e4(exported):
    weights, folder = exported("tiny-cn/VIT-T-8")
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["ChineseCLIPModel"]
    assert (folder / "vocab.txt").is_file() and not (folder / "vocab.json").exists()
    _check_parity(folder, CLIP(model_path=str(weights), phi="tiny-cn/VIT-T-8", cuda=False, precision="fp32"))


@pytest.mark.skipif(not HAS_ACTIVATION, reason="VisionConfig has no activation field yet")
def test_gelu_export_with_head_width_32_matches_transformers_1e4(tmp_path):
    # A table-free architecture: GELU in both towers, 4 heads of 32, and a 3x MLP where the table can say so.
    base = get_config("tiny/VIT-T-8")
    mlp = {"mlp_ratio": 3.0} if "mlp_ratio" in {f.name for f in dataclasses.fields(VisionConfig)} else {}
    config = dataclasses.replace(base, vision=dataclasses.replace(base.vision, activation="gelu", heads=4, **mlp),
                                 text=dataclasses.replace(base.text, activation="gelu", heads=4, **mlp))
    ours = CLIP(model_path="", phi="tiny/VIT-T-8", cuda=False, precision="fp32")
    ours.net = build_model(config).eval()
    ours.net.load_state_dict(_perturbed(config))
    folder = tmp_path / "hf"
    export_hf.write_folder(folder, export_hf.export_files(ours))
    hf_config = json.loads((folder / "config.json").read_text())
    assert hf_config["vision_config"]["hidden_act"] == hf_config["text_config"]["hidden_act"] == "gelu"
    assert hf_config["vision_config"]["num_attention_heads"] == 4
    _check_parity(folder, ours)


@pytest.mark.parametrize("phi", ["tiny/VIT-T-8", "tiny-cn/VIT-T-8"])
def test_export_read_back_with_phi_auto_gives_equal_tensors(exported, phi):
    # The key map that reads transformers folders (utils/weights/layouts.py) is the one that wrote it, run backwards.
    weights, folder = exported(phi)
    back, resolved = load_model(folder, "auto")
    assert resolved == phi
    original, loaded = torch.load(weights, weights_only=True), back.state_dict()
    assert original.keys() == loaded.keys()
    assert all(torch.equal(original[k], loaded[k]) for k in original)


def test_self_cn_refused_in_one_line_before_anything_is_written(tmp_path, capsys, tiny_weights):
    folder = tmp_path / "new" / "hf"
    result = run_script("predict.py", "--mode", "export_hf", "--model_path", tiny_weights,
                        "--phi", "self-cn/VIT-B-32", "--export_dir", folder, capsys=capsys)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "self-cn" in result.stderr and "ln_final" in result.stderr
    assert not list(tmp_path.iterdir())  # not even export_dir's parent


def test_resnet_refused_in_one_line_before_anything_is_written(tmp_path, capsys, tiny_weights):
    resnets = [phi for phi in MODEL_CONFIGS if getattr(get_config(phi).vision, "kind", "vit") == "resnet"]
    if not resnets:
        # Until the table has ResNet rows, the rule itself: a config whose image tower is a ResNet.
        config = get_config("tiny/VIT-T-8")
        resnet = type("ResNetVision", (), {"kind": "resnet"})()
        assert "ResNet" in export_hf.refusal(dataclasses.replace(config, vision=resnet))
        return
    folder = tmp_path / "hf"
    result = run_script("predict.py", "--mode", "export_hf", "--model_path", tiny_weights,
                        "--phi", resnets[0], "--export_dir", folder, capsys=capsys)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "ResNet" in result.stderr
    assert not folder.exists()


def test_existing_folder_refused_unless_an_earlier_export(tmp_path, exported, capsys, tiny_weights):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = run_script("predict.py", "--mode", "export_hf", "--model_path", tiny_weights,
                        "--phi", "tiny/VIT-T-8", "--export_dir", mine, capsys=capsys)
    assert result.returncode == 2 and "not empty" in result.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    export_hf.check_target(exported("tiny/VIT-T-8")[1])  # an earlier export: allowed, and replaced below
    export_hf.check_target(tmp_path / "new")


def test_write_folder_replaces_an_earlier_export_and_a_failed_check_leaves_it_untouched(tmp_path):
    folder = tmp_path / "hf"
    files = {"config.json": b'{"architectures": ["CLIPModel"]}', "model.safetensors": b"first"}

    def fail(temp: Path) -> None:
        assert (temp / "model.safetensors").read_bytes() == b"second"  # the check sees the new files
        raise UserError("check failed")

    with pytest.raises(UserError, match="check failed"):
        export_hf.write_folder(folder, {**files, "model.safetensors": b"second"}, fail)
    assert not list(tmp_path.iterdir())
    export_hf.write_folder(folder, files)
    with pytest.raises(UserError, match="check failed"):
        export_hf.write_folder(folder, {**files, "model.safetensors": b"second"}, fail)
    assert (folder / "model.safetensors").read_bytes() == b"first"
    export_hf.write_folder(folder, {"config.json": b"{}", "model.safetensors": b"third"})
    assert (folder / "model.safetensors").read_bytes() == b"third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def _open_clip_config(config) -> dict:
    """open_clip's model config (its JSON layout) for an architecture of this repo's table."""
    v, t = config.vision, config.text
    return {"embed_dim": config.embed_dim,
            "quick_gelu": getattr(v, "activation", "quick_gelu") == "quick_gelu",
            "vision_cfg": {"image_size": v.image_size, "layers": v.layers, "width": v.width,
                           "patch_size": v.patch_size, "head_width": v.width // v.heads,
                           "mlp_ratio": getattr(v, "mlp_ratio", 4.0)},
            "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                         "heads": t.heads, "layers": t.layers, "mlp_ratio": getattr(t, "mlp_ratio", 4.0)}}


def test_open_clip_loads_this_projects_weight_file_features_1e4(tmp_path, tiny_weights, monkeypatch):
    open_clip = pytest.importorskip("open_clip")
    from open_clip import factory

    # Registered for this test only: test_open_clip compares the registry with the model table.
    monkeypatch.setattr(factory, "_MODEL_CONFIGS", dict(factory._MODEL_CONFIGS))
    monkeypatch.setattr(factory, "_MODEL_CONFIG_PATHS", list(factory._MODEL_CONFIG_PATHS))
    config = get_config("tiny/VIT-T-8")
    configs = tmp_path / "open_clip_configs"
    configs.mkdir()
    (configs / "clip-pytorch-tiny-quickgelu.json").write_text(json.dumps(_open_clip_config(config)))
    open_clip.add_model_config(configs)
    # The README's call, on the weight file as train.py writes it (a plain state dict with OpenAI's keys).
    model, _, preprocess = open_clip.create_model_and_transforms("clip-pytorch-tiny-quickgelu",
                                                                 pretrained=str(tiny_weights))
    model.eval()
    tokenizer = open_clip.get_tokenizer("clip-pytorch-tiny-quickgelu")
    ours = CLIP(model_path=str(tiny_weights), phi="tiny/VIT-T-8", cuda=False, precision="fp32")
    captions = CAPTIONS["openai"]
    image_features, text_features = ours.detect_image_for_eval([IMAGE], captions)
    with torch.no_grad():
        assert (model.encode_image(preprocess(IMAGE)[None]) - image_features).abs().max() < 1e-4
        assert (model.encode_text(tokenizer(captions)) - text_features).abs().max() < 1e-4
