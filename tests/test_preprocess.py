"""Preprocessing is part of the weights: every source's record, and parity with open_clip's and transformers'
transforms on real (non-square) photos, through every path that makes model input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip import CLIP
from nets.configs import MODEL_CONFIGS
from nets.open_clip_configs import from_open_clip
from utils.data.augment import CaptionAugment
from utils.data.images import eval_transform
from utils.data.preprocess import OPENAI, Preprocess
from utils.errors import UserError
from utils.weights import pretrained
from utils.weights.arch import read_arch, save_weights
from utils.weights.load import init_model, load_model, preprocess_of

open_clip = pytest.importorskip("open_clip")

# A small GELU open_clip ViT, with random weights drawn by _open_clip_model.
MODEL_CFG = dict(embed_dim=32, vision_cfg=dict(image_size=64, patch_size=16, width=64, layers=2, head_width=32),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
SIZE = MODEL_CFG["vision_cfg"]["image_size"]
# Records no pretrained OpenAI file has: each resize mode, LAION's mean/std, bilinear resampling, a fill.
RECORDS = {
    "shortest-inception-bilinear": dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear",
                                        resize_mode="shortest"),
    "squash": dict(resize_mode="squash"),
    "longest-fill": dict(mean=(0.4, 0.45, 0.5), std=(0.2, 0.25, 0.3), resize_mode="longest", fill_color=90),
}


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """scikit-learn's two sample photos (427 x 640), and one cut to 426 x 640: transformers crops the centre at
    floor((w - crop) / 2) where torchvision rounds, one column apart on the first two."""
    datasets = pytest.importorskip("sklearn.datasets")
    images = [Image.fromarray(a) for a in datasets.load_sample_images().images]
    return images + [images[0].crop((0, 0, 640, 426))]


def _open_clip_model(model_cfg: dict):
    with torch.device("meta"):
        model = open_clip.model.CLIP(**model_cfg)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5 + (1.0 if p.dim() == 1 and "weight" in _ else 0))
    return model.eval()


def _open_clip_folder(folder: Path, preprocess_cfg: dict | None) -> Path:
    """The layout open_clip's push_to_hub writes (and hf-hub: names load), with its random weights."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": MODEL_CFG, **({"preprocess_cfg": preprocess_cfg} if preprocess_cfg is not None else {})}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    save_file(_open_clip_model(MODEL_CFG).state_dict(), folder / "open_clip_model.safetensors")
    return folder


def _ours(model: CLIP, images) -> torch.Tensor:
    return model.detect_image_for_eval(list(images))[0].float()


def test_every_pretrained_row_has_open_clips_preprocessing():
    """All 169 (architecture, tag) pairs (70 OpenAI-style, 26 SigLIP, 7 CLIPA, 12 ConvNeXt, 7 EVA, 15 ViTamin,
    5 PE-Core, 10 MobileCLIP, 9 HF text towers, 4 MetaCLIP 2, 4 CoCa) against open_clip 3.3's get_pretrained_cfg: mean, std,
    filter, resize."""
    assert len(pretrained.PRETRAINED) == 169
    for (arch, tag), row in pretrained.PRETRAINED.items():
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        assert cfg, (arch, tag)
        theirs = Preprocess.from_open_clip(cfg, f"{arch} {tag}")
        ours = row.preprocess
        assert (ours.mean, ours.std, ours.interpolation, ours.resize_mode) == \
            (theirs.mean, theirs.std, theirs.interpolation, theirs.resize_mode), (arch, tag)
    assert pretrained.PRETRAINED["ViT-L-14", "laion2b_s32b_b82k"].preprocess.mean == (0.5, 0.5, 0.5)
    assert [key for key, row in pretrained.PRETRAINED.items() if row.preprocess.resize_mode == "squash"
            and row.tag not in ("webli", "meta") and "CLIPA" not in key[0] and "siglip" not in key[0]] == [
        ("ViT-H-14", "dfn5b"), ("ViT-H-14-378", "dfn5b"), ("ViT-H-14-worldwide-378", "metaclip2_worldwide"),
        ("ViT-bigG-14-worldwide-378", "metaclip2_worldwide")]
    siglip = {key: row for key, row in pretrained.PRETRAINED.items() if "SigLIP" in key[0]}
    assert len(siglip) == 26 and all(row.preprocess.mean == row.preprocess.std == (0.5, 0.5, 0.5)
                                     and row.preprocess.resize_mode == "squash" for row in siglip.values())


@pytest.mark.parametrize("name", RECORDS)
def test_each_resize_mode_equals_open_clips_image_transform_pixels_bit_for_bit_tensors_1e6(name, photos):
    cfg = RECORDS[name]
    record = Preprocess.from_open_clip(cfg, name)
    theirs = open_clip.image_transform(SIZE, is_train=False, mean=cfg.get("mean"), std=cfg.get("std"),
                                       resize_mode=cfg["resize_mode"], interpolation=cfg.get("interpolation"),
                                       fill_color=cfg.get("fill_color", 0))
    ours = eval_transform(SIZE, preprocess=record)
    *geometry, to_tensor, normalize = theirs.transforms
    for image in photos + [photos[0].rotate(90, expand=True)]:
        expected = image
        for step in geometry:
            expected = step(expected)
        assert np.array_equal(np.asarray(ours.resize(image)), np.asarray(expected)), (name, image.size)
        # open_clip's ToTensor divides by 255 where torchvision's v2 (and EvalTransform) multiply: 1 ulp.
        assert (ours(image) - theirs(image)).abs().max() < 1e-6, (name, image.size)


def test_decode_sides_keep_what_each_resize_needs():
    assert eval_transform(224).decode_sides() == (224, 224)
    assert eval_transform(224, preprocess=Preprocess(resize_mode="squash")).decode_sides() == (224, 224)
    assert eval_transform(224, preprocess=Preprocess(resize_mode="longest")).decode_sides() == (1, 224)
    assert eval_transform(224, letterbox=True).decode_sides() == (1, 224)
    assert CaptionAugment(224, "none", preprocess=Preprocess(resize_mode="longest")).decode_sides() == (1, 224)
    assert CaptionAugment(224, "light", preprocess=Preprocess(resize_mode="squash")).decode_sides() == (224, 224)


@pytest.mark.parametrize("name", RECORDS)
def test_open_clip_hub_folder_with_auto_matches_create_model_and_transforms_1e4(name, photos, tmp_path):
    folder = _open_clip_folder(tmp_path / "hub", RECORDS[name])
    reference, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    reference.eval()
    model = CLIP(model_path=str(folder), phi="auto", cuda=False, precision="fp32", fast_decode=False)
    assert model.transform.preprocess == Preprocess.from_open_clip(RECORDS[name], name)
    with torch.no_grad():
        expected = reference.encode_image(torch.stack([transform(image) for image in photos]))
    assert (_ours(model, photos) - expected).abs().max() < 1e-4
    # letterbox_image=True still wins over the folder's resize mode.
    boxed = CLIP(model_path=str(folder), phi="auto", cuda=False, precision="fp32", letterbox_image=True)
    assert boxed.transform.preprocess.resize_mode == "longest"


def _fill_hub_cache(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """huggingface_hub's cache as an earlier download leaves it: refs/main naming a snapshot of the files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


@pytest.fixture
def laion_cache(tmp_path, monkeypatch):
    """`--phi ViT-L-14 --model_path laion2b_s32b_b82k` served offline from huggingface_hub's cache: the real row
    and repo name, with ViT-L-14 shrunk to MODEL_CFG's sizes (the real one is 1.7 GB) and the repo's
    open_clip_config.json without its preprocess_cfg, so mean 0.5 can come only from the row."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(MODEL_CONFIGS, "ViT-L-14", from_open_clip(MODEL_CFG).to_dict())
    folder = _open_clip_folder(tmp_path / "files", None)
    row = pretrained.PRETRAINED["ViT-L-14", "laion2b_s32b_b82k"]
    _fill_hub_cache(tmp_path / "hub", row.source.removeprefix("hf-hub:"),
                    {p.name: p.read_bytes() for p in folder.iterdir()})
    return folder


def test_a_tag_by_name_offline_uses_the_rows_preprocessing_within_1e4(laion_cache, photos):
    model = CLIP(model_path="laion2b_s32b_b82k", phi="ViT-L-14", cuda=False, precision="fp32", fast_decode=False)
    assert model.transform.preprocess.mean == (0.5, 0.5, 0.5)
    reference, _, _ = open_clip.create_model_and_transforms(f"local-dir:{laion_cache}")
    cfg = open_clip.get_pretrained_cfg("ViT-L-14", "laion2b_s32b_b82k")
    transform = open_clip.image_transform(SIZE, is_train=False, mean=cfg["mean"], std=cfg["std"])
    with torch.no_grad():
        expected = reference.eval().encode_image(torch.stack([transform(image) for image in photos]))
    assert (_ours(model, photos) - expected).abs().max() < 1e-4


def test_weights_fine_tuned_from_a_laion_tag_keep_its_mean_in_their_record(laion_cache, tmp_path):
    model, phi, _ = init_model("ViT-L-14", "laion2b_s32b_b82k")
    assert preprocess_of(model).mean == (0.5, 0.5, 0.5)
    save_weights(model.state_dict(), tmp_path / "w.pth", model.config, phi, preprocess_of(model))
    assert read_arch(tmp_path / "w.pth")[1] == preprocess_of(model)
    again, _ = load_model(tmp_path / "w.pth", "auto")
    assert preprocess_of(again).mean == (0.5, 0.5, 0.5)


@pytest.mark.slow
def test_a_training_run_from_a_laion_tag_writes_its_mean_beside_the_weights(laion_cache, tmp_path, capsys):
    from tests.test_training import train, train_args
    from utils.data.toy import make_toy_dataset

    make_toy_dataset(tmp_path / "toy", n_train=8, n_val=4, seed=1)
    args = train_args(tmp_path / "toy", tmp_path / "logs", phi="ViT-L-14", model_path="laion2b_s32b_b82k",
                      batch_size=4, Epoch=1, eval_period=1)
    result = train(args, capsys)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("last_epoch_weights.pth", "best_epoch_weights.pth"):
        assert read_arch(tmp_path / "logs" / name)[1].mean == (0.5, 0.5, 0.5), name


def _transformers_folder(folder: Path, processor: dict) -> tuple:
    import transformers

    from nets import build_model
    from tests.test_models import _hf_clip

    config = from_open_clip(MODEL_CFG)
    torch.manual_seed(0)
    hf = _hf_clip(config, build_model(config).state_dict())
    hf.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor",
                                                                 **processor}))
    return hf, transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")


def test_transformers_folder_preprocessor_config_is_read_1e4(photos, tmp_path):
    record = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", resize_mode="squash")
    hf, processor = _transformers_folder(tmp_path / "hf", record.to_transformers(SIZE))
    model = CLIP(model_path=str(tmp_path / "hf"), phi="auto", cuda=False, precision="fp32", fast_decode=False)
    assert model.transform.preprocess == record
    with torch.no_grad():
        expected = hf.get_image_features(**processor(images=photos, return_tensors="pt"))
    expected = getattr(expected, "pooler_output", expected)
    assert (_ours(model, photos) - expected).abs().max() < 1e-4


def _exported_model(tmp_path, name: str) -> CLIP:
    folder = _open_clip_folder(tmp_path / "hub", RECORDS[name])
    return CLIP(model_path=str(folder), phi="auto", cuda=False, precision="fp32", fast_decode=False)


@pytest.mark.slow
def test_onnx_export_keeps_the_weights_preprocessing_1e4(photos, tmp_path):
    """One export (about 15 s): the letterboxing record with its own mean, std and fill; the numpy preprocessing
    of every other record is held to EvalTransform below."""
    pytest.importorskip("onnxruntime")
    from utils.export.onnx_export import export_files, write_files
    from utils.export.onnx_predict import OnnxCLIP

    model = _exported_model(tmp_path, "longest-fill")
    (tmp_path / "onnx").mkdir()
    write_files(tmp_path / "onnx", export_files(model, log=lambda line: None))
    onnx = OnnxCLIP(tmp_path / "onnx", fast_decode=False)
    got = onnx.encode_image(onnx.preprocess(photos))
    assert np.abs(got - _ours(model, photos).numpy()).max() < 1e-4
    assert OnnxCLIP(tmp_path / "onnx").decode_sides == model.transform.decode_sides() == (1, SIZE)


@pytest.mark.parametrize("name", RECORDS)
def test_onnx_numpy_preprocessing_of_each_record_equals_eval_transform_1e6(name, photos):
    from utils.export.preprocess import pixels, to_config

    record = Preprocess.from_open_clip(RECORDS[name], name)
    config = {"image_size": SIZE, "dtype": "float32", **to_config(record)}
    expected = torch.stack([eval_transform(SIZE, preprocess=record)(image) for image in photos]).numpy()
    assert np.abs(pixels(photos, config) - expected).max() < 1e-6


@pytest.mark.parametrize("name", ["shortest-inception-bilinear", "squash"])
def test_transformers_export_processor_reads_the_weights_preprocessing_1e4(name, photos, tmp_path):
    import transformers

    from utils.export.hf import export_files, write_folder

    model = _exported_model(tmp_path, name)
    write_folder(tmp_path / "out", export_files(model))
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "out").eval()
    # PIL's resize, as the export's own check reads it: transformers 5's default backend resizes tensors
    # with torchvision (antialiased bilinear/bicubic on floats), which is not the PIL resize the weights saw.
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "out", backend="pil")
    # transformers crops the centre at floor((w - crop) / 2), torchvision rounds: on the 427-row photos the
    # crops of `shortest` are a column apart, so that mode is held to the photo whose crops agree.
    images = photos if name == "squash" else photos[2:]
    with torch.no_grad():
        expected = hf.get_image_features(**processor(images=images, return_tensors="pt"))
    expected = getattr(expected, "pooler_output", expected)
    assert (_ours(model, images) - expected).abs().max() < 1e-4


def test_a_letterbox_record_is_not_exported_to_transformers(tmp_path):
    from utils.export.hf import export_files

    with pytest.raises(UserError, match="cannot letterbox"):
        export_files(_exported_model(tmp_path, "longest-fill"))


def test_integer_tensors_where_the_model_has_floats_are_refused_naming_file_and_key(tmp_path):
    """A safetensors header that labels float bytes I32 (same size) loaded and predicted nan."""
    from safetensors.torch import save_file

    from nets import build_model, get_config

    state = build_model(get_config("tiny/VIT-T-8")).state_dict()
    state["visual.proj"] = state["visual.proj"].view(torch.int32)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match=r"bad\.safetensors: tensor 'visual\.proj' is int32, which cannot hold") as e:
        load_model(tmp_path / "bad.safetensors", "tiny/VIT-T-8")
    assert "\n" not in str(e.value)


def test_bad_records_are_one_line_naming_the_file(tmp_path):
    with pytest.raises(UserError, match="x.json: preprocess_cfg .* is not valid"):
        Preprocess.from_open_clip({"resize_mode": "crop"}, "x.json")
    with pytest.raises(UserError, match="y.json: image_mean"):
        Preprocess.from_transformers({"resample": 9}, "y.json")
    assert Preprocess.from_transformers({}, "z.json") == OPENAI
