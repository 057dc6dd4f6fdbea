"""predict.py --mode export_hf for the multilingual families transformers has a class for: MetaCLIP 2 "worldwide"
(open_clip's ViT-*-worldwide: OpenAI's towers over XLM-V, first-</s> pooling) as MetaClip2Model, and AltCLIP (XLM-R
tower, nets/text_altclip.py) as AltCLIPModel.

Exactness claims: the folder loads with no missing, unexpected or reshaped key; transformers' get_image_features /
get_text_features on a photo and English and Chinese captions, through the folder's own processor, are within 1e-4
of ours; its tokenizer gives our token ids; the folder read back with phi="auto" gives our features within 1e-5.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clip import CLIP
from nets import build_model, get_config
from tests.conftest import run_script

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

from tests.test_multilingual_hf import _moved, save_folder, tiny_altclip  # noqa: E402
from tests.test_open_clip import _open_clip_model  # noqa: E402
from tests.test_worldwide import SMALL, xlm_tokenizer_folder  # noqa: E402

CAPTIONS = ["a photo of the dog", "这是一张猫的照片", "two red cars on a big tree", "一只狗", "cat " * 100]
# Squashed: transformers' centre crop is a column off torchvision's on these photos (tests/test_preprocess.py).
SQUASH = {"interpolation": "bilinear", "resize_mode": "squash"}


def _photo():
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return Image.fromarray(load_sample_images().images[0])


def _worldwide_folder(folder: Path) -> Path:
    """open_clip's ViT-H-14-worldwide layout at a small size (random weights in every parameter) with XLM-R-style
    tokenizer files beside it, as its hub repo holds them."""
    xlm_tokenizer_folder(folder)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": SMALL, "preprocess_cfg": SQUASH}))
    torch.save(_open_clip_model(SMALL).state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def _export(source: Path, folder: Path, capsys) -> None:
    result = run_script("predict.py", "--mode", "export_hf", "--model_path", source, "--phi", "auto",
                        "--export_dir", folder, capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "transformers vs this model" in result.stdout


def _check(folder: Path, ours: CLIP, model_class, processor_class) -> None:
    hf, info = model_class.from_pretrained(folder, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info  # no missing, unexpected or mismatched key
    hf.eval()
    assert json.loads((folder / "config.json").read_text())["architectures"] == [model_class.__name__]
    processor = processor_class.from_pretrained(folder, backend="pil")
    assert type(processor) is transformers.AutoProcessor.from_pretrained(folder, backend="pil").__class__
    photo = _photo()
    tokens = ours.tokenize(CAPTIONS)
    # Its tokenizer cuts at the text tower's context by itself (model_max_length), keeping </s>, as ours does.
    inputs = processor(text=CAPTIONS, images=photo, return_tensors="pt", padding="max_length", truncation=True)
    assert torch.equal(inputs["input_ids"], tokens)
    with torch.no_grad():
        image, text = ours.detect_image_for_eval([photo], CAPTIONS)
        theirs_image = hf.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        theirs_text = hf.get_text_features(input_ids=inputs["input_ids"],
                                           attention_mask=inputs["attention_mask"]).pooler_output
    for a, b in ((image, theirs_image), (text, theirs_text)):
        assert a.shape == b.shape and b.abs().max() > 1e-2
        assert (a.float() - b).abs().max() < 1e-4, (a.float() - b).abs().max()
    back = CLIP(model_path=str(folder), phi="auto", cuda=False, precision="fp32")
    assert torch.equal(back.tokenize(CAPTIONS), tokens)
    with torch.no_grad():
        for a, b in zip(back.detect_image_for_eval([photo], CAPTIONS), (image, text)):
            assert (a - b).abs().max() < 1e-5


def test_metaclip2_worldwide_exports_as_metaclip2model_features_within_1e_4(tmp_path, capsys):
    source = _worldwide_folder(tmp_path / "worldwide")
    folder = tmp_path / "hf"
    _export(source, folder, capsys)
    ours = CLIP(model_path=str(source), phi="auto", cuda=False, precision="fp32")
    assert (ours.net.config.text.pool, ours.net.config.text.tokenizer) == ("eos", "facebook/xlm-v-base")
    assert "tokenizer.json" in {p.name for p in folder.iterdir()}
    _check(folder, ours, transformers.MetaClip2Model, transformers.CLIPProcessor)


def test_altclip_exports_as_altclipmodel_features_within_1e_4(tmp_path, capsys):
    source = save_folder(tiny_altclip(), tmp_path / "altclip")
    folder = tmp_path / "hf"
    _export(source, folder, capsys)
    _check(folder, CLIP(model_path=str(source), phi="auto", cuda=False, precision="fp32"),
           transformers.AltCLIPModel, transformers.AltCLIPProcessor)


def test_altclip_export_is_written_from_this_models_weights(tmp_path):
    """Weights moved after loading (so they are no longer the folder's): the export holds the moved ones."""
    from utils.export import hf as export_hf

    ours = CLIP(model_path=str(save_folder(tiny_altclip(), tmp_path / "altclip")), phi="auto", cuda=False,
                precision="fp32")
    _moved(ours.net)
    worst = []
    export_hf.write_folder(tmp_path / "hf", export_hf.export_files(ours),
                           lambda temp: worst.append(export_hf.compare(temp, ours, log=lambda line: None)))
    assert worst[0] <= 1e-4, worst
    _check(tmp_path / "hf", ours, transformers.AltCLIPModel, transformers.AltCLIPProcessor)


def _altclip_row():
    from tests.test_family_jobs import _altclip

    return _altclip()


@pytest.mark.parametrize("make", [lambda: get_config("ViT-H-14-worldwide"),
                                  lambda: get_config("ViT-bigG-14-worldwide-378-quickgelu"), _altclip_row],
                         ids=["ViT-H-14-worldwide", "ViT-bigG-14-worldwide-378-quickgelu", "AltCLIP-ViT-L-14"])
def test_real_sizes_export_every_key_transformers_builds_at_its_shape(make):
    """At the real rows' sizes, on the meta device: the export's names and shapes are those of the transformers
    model its config builds (AltCLIP's files name its stacks `layer.N`, its modules `layers.N`)."""
    from utils.export import hf as export_hf
    from utils.weights.layouts import openai_to_transformers, transformers_config

    config = make()
    assert export_hf.refusal(config) is None
    with torch.device("meta"):
        ours = build_model(config)
        theirs = getattr(transformers, export_hf.transformers_class(config))(
            transformers_config(config, bos_token_id=0, pad_token_id=1))
    written = {k.replace(".layer.", ".layers."): tuple(v.shape)
               for k, v in openai_to_transformers(ours.state_dict()).items()}
    assert written == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
