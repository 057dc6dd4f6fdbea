"""MetaCLIP 2 "worldwide" (open_clip's ViT-*-worldwide*): OpenAI's towers over XLM-V's vocabulary, pooling the first
`</s>` (eos_id 2), with XLM-V's tokenizer read from the weights' files: exact against open_clip 3.3."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from clip import CLIP
from nets import get_config
from nets.configs import WORLDWIDE
from nets.open_clip_configs import from_open_clip
from tests.conftest import meta_models_with_open_clips_names_and_shapes, write_hf_tokenizer
from tests.test_open_clip import _open_clip_model, _ours_with_weights_of
from utils.errors import UserError
from utils.tokenizer import HubTokenizer
from utils.weights import memory, pretrained
from utils.weights.load import load_model

open_clip = pytest.importorskip("open_clip")

XLM_V = "facebook/xlm-v-base"
# Sentencepiece pieces of an XLM-R-style unigram model: English and Chinese words, and single characters.
_PIECES = ("▁a ▁photo ▁of ▁the ▁dog ▁cat ▁car ▁red ▁big ▁two ▁on ▁tree ▁一 张 只 猫 狗 的 照片 汽车 红色 两 s ing , . "
           "▁这 是").split()


def xlm_tokenizer_folder(folder: Path) -> Path:
    """A tiny XLM-R-style tokenizer (XLM-V's and XLM-R's ids: <s> 0, <pad> 1, </s> 2, <unk> 3), no hub: its
    tokenizer.json built with `tokenizers`, as the weights' repos hold one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    chars = sorted(set("abcdefghijklmnopqrstuvwxyz") | set("".join(_PIECES)) - {"▁"}) + ["▁"]
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, -float(i + 1)) for i, p in enumerate(_PIECES)] + [(c, -40.0) for c in chars if c not in _PIECES]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                             special_tokens=[("<s>", 0), ("</s>", 2)])
    return write_hf_tokenizer(folder, tokenizer, {
        "tokenizer_class": "XLMRobertaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "cls_token": "<s>", "sep_token": "</s>", "mask_token": "<unk>",
        "model_max_length": 512})


VOCAB = 4 + len(set(_PIECES) | set("abcdefghijklmnopqrstuvwxyz") | set("".join(_PIECES)) - {"▁"}) + 1
# ViT-H-14-worldwide's settings at a size the CPU builds in a moment (vocab: the tokenizer's above).
SMALL = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
             text_cfg=dict(hf_tokenizer_name=XLM_V, pool_type="eos", eos_id=2, context_length=77, vocab_size=VOCAB,
                           width=48, heads=2, layers=2))
CAPTIONS = ["a photo of the dog", "这是一张猫的照片", "two  red cars on a big tree &amp; a cat", "", "cat " * 100]


def test_rows_are_what_from_open_clip_makes_of_open_clips_json():
    names = [*WORLDWIDE, "ViT-H-14-worldwide-quickgelu"]
    for name in names:
        assert get_config(name) == from_open_clip(open_clip.get_model_config(name)), name
    text = get_config("ViT-bigG-14-worldwide").text
    assert (text.vocab_size, text.pool, text.eos_id, text.tokenizer) == (901629, "eos", 2, XLM_V)


def test_tokenizer_ids_equal_open_clips_hf_tokenizer(tmp_path):
    folder = xlm_tokenizer_folder(tmp_path / "tok")
    ours = HubTokenizer(XLM_V, folder, 77)
    theirs = open_clip.tokenizer.HFTokenizer(str(folder), context_length=77)
    assert ours.vocab_size == VOCAB
    ids = ours(CAPTIONS)
    assert torch.equal(ids, theirs(CAPTIONS))
    assert (ids[:, 0] == 0).all() and ids[4, -1] == 2 and ids[3, 2] == 1  # <s> first, </s> kept on cut, <pad> 1
    assert (ids[1] == 3).sum() == 0  # the Chinese caption is all known pieces, no <unk>


def _folder(tmp_path: Path, reference) -> Path:
    folder = xlm_tokenizer_folder(tmp_path / "hub")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": SMALL, "preprocess_cfg": {}}))
    torch.save(reference.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def test_an_open_clip_folder_loads_with_auto_and_gives_open_clips_features_within_1e_4(tmp_path):
    from sklearn.datasets import load_sample_images

    reference = _open_clip_model(SMALL)
    folder = _folder(tmp_path, reference)
    model = CLIP(model_path=str(folder), phi="auto", cuda=False)
    assert model.net.config == from_open_clip(SMALL) and isinstance(model.tokenizer, HubTokenizer)
    photo = Image.fromarray(load_sample_images().images[1])
    transform = open_clip.image_transform(32, is_train=False)
    tokens = open_clip.tokenizer.HFTokenizer(str(folder), context_length=77)(CAPTIONS)
    with torch.no_grad():
        theirs = reference.encode_image(transform(photo)[None]), reference.encode_text(tokens)
        ours = model.detect_image_for_eval(images=[photo], texts=CAPTIONS)
        for a, b in zip(ours, theirs):
            assert (a - b).abs().max() < 1e-4
        # Pooling the largest id (OpenAI's EOT), as the tower did before eos pooling, reads another token.
        argmax = _ours_with_weights_of(reference, replace(model.net.config,
                                                          text=replace(model.net.config.text, pool="argmax")))
        assert (argmax.encode_text(tokens) - theirs[1]).abs().max() > 1e-3


def test_the_pairs_resolve_to_timms_repos_with_their_activation_and_preprocessing():
    quick = pretrained.PRETRAINED[("ViT-H-14-worldwide", "metaclip2_worldwide")]
    assert quick.activation == pretrained.QUICK_GELU
    assert quick.source == "hf-hub:timm/vit_huge_patch14_clip_224.metaclip2_worldwide"
    assert pretrained.phi_with_activation("ViT-H-14-worldwide", quick.activation, "") == "ViT-H-14-worldwide-quickgelu"
    for name in ("ViT-H-14-worldwide-378", "ViT-bigG-14-worldwide-378"):
        row = pretrained.PRETRAINED[(name, "metaclip2_worldwide")]
        cfg = open_clip.get_pretrained_cfg(name, "metaclip2_worldwide")
        assert row.activation == pretrained.GELU and row.preprocess.resize_mode == cfg["resize_mode"] == "squash"


def test_the_largest_is_refused_in_one_line_before_any_download_when_ram_is_short(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "free_bytes", lambda device="cpu": 8 * memory.GiB)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))
    with pytest.raises(UserError) as e:
        load_model("metaclip2_worldwide", "ViT-bigG-14-worldwide")
    message = str(e.value)
    assert "\n" not in message and "ViT-bigG-14-worldwide" in message and "8.0 GiB is free" in message
    need = float(message.split("needs about ")[1].split(" GiB")[0])
    assert 13 < need < 15  # 3.6 billion parameters in fp32, 1.15 billion of them XLM-V's token embedding


@pytest.mark.parametrize("name", [*WORLDWIDE, "ViT-H-14-worldwide-quickgelu"])
def test_every_worldwide_architecture_has_open_clips_parameter_names_and_shapes(name):
    meta_models_with_open_clips_names_and_shapes(name, get_config(name))
