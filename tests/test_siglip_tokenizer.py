"""SigLIP's tokenizer from the files beside its weights: token ids equal to open_clip's `HFTokenizer` with
`clean='canonicalize'` on a small sentencepiece-style tokenizer.json built here (no hub), a folder without
tokenizer files named in one line, and `CLIP(model_path=folder, phi='auto').detect_image` equal to open_clip's
sigmoid scores within 1e-4."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_siglip_table import _hub_folder, _tiny_pair
from tests.test_download import env  # noqa: F401
from tests.test_siglip_towers import tiny_open_clip  # noqa: F401
from utils.errors import UserError
from utils.tokenizer import SIGLIP_TOKENIZER_FILES, SiglipTokenizer, build_tokenizer, canonicalize

open_clip = pytest.importorskip("open_clip")
tokenizers = pytest.importorskip("tokenizers")

CAPTIONS = ["a photo of a Cat.", "A DOG, running_fast!  on the   beach", "", "two birds", "Café au lait? 42 cups",
            "a very long caption " * 12]
CORPUS = ["a photo of a cat", "a dog running fast on the beach", "two birds in the sky", "cafe au lait cups",
          "a very long caption about pictures of animals and people", "the quick brown fox jumps over the lazy dog"]


def write_tokenizer(folder: Path, vocab_size: int = 120) -> Path:
    """A sentencepiece-style Unigram tokenizer (Metaspace, `</s>` appended, `<pad>` id 0) like SigLIP's repos'
    tokenizer.json, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=vocab_size, unk_token="<unk>",
                                                            special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 64}))
    return folder


def write_spiece(folder: Path) -> Path:
    """A sentencepiece model with a T5Tokenizer config (`</s>` appended, `<pad>` id 0), as SigLIP's repos that
    ship `spiece.model` have it: read through `sentencepiece`."""
    import io

    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=60,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
                                   hard_vocab_limit=False)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 64, "extra_ids": 0}))
    return folder


def test_canonicalize_is_open_clips():
    from open_clip.tokenizer import canonicalize_text

    for text in CAPTIONS + ["under_score  TABS\tand\nnewlines", "{braces} [and] <more>"]:
        assert canonicalize(text) == canonicalize_text(text)


@pytest.mark.parametrize("writer", [write_tokenizer, write_spiece], ids=["tokenizer.json", "spiece.model"])
@pytest.mark.parametrize("context_length", [64, 16, 8])
def test_ids_are_open_clips_hf_tokenizer_with_canonicalize(tmp_path, context_length, writer):
    folder = writer(tmp_path / "tok")
    ours = SiglipTokenizer(folder, context_length)
    theirs = open_clip.tokenizer.HFTokenizer(str(folder), context_length=context_length, clean="canonicalize",
                                             local_files_only=True)
    expected = theirs(CAPTIONS).numpy()
    got = ours.ids(CAPTIONS)
    assert got.shape == (len(CAPTIONS), context_length) and got.dtype == np.int64
    assert (got == expected).all()
    assert (got[:, -1] == ours.pad_token_id).any() and (got[:, -1] == 1).any()  # padded, and cut with </s> kept
    assert (ours(CAPTIONS) == torch.from_numpy(expected)).all()
    assert (build_tokenizer("siglip", context_length, folder).ids(CAPTIONS) == expected).all()


def test_a_folder_without_tokenizer_files_names_them_in_one_line(tmp_path):
    with pytest.raises(UserError) as err:
        SiglipTokenizer(tmp_path, 64)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message
    assert all(name in message for name in SIGLIP_TOKENIZER_FILES)
    with pytest.raises(UserError, match="no weights"):
        SiglipTokenizer(None, 64)


@pytest.mark.slow
def test_detect_image_on_a_siglip_folder_is_open_clips_sigmoid_within_1e_4(tiny_open_clip, tmp_path):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from clip import CLIP

    cfg, reference = _tiny_pair(tiny_open_clip, siglip2=True)
    with torch.no_grad():
        reference.logit_bias.fill_(-1.0)  # SigLIP's -10 puts every random-weight score near 0, where all agree
    folder = _hub_folder(tmp_path, cfg, reference)
    write_tokenizer(folder)
    image = Image.fromarray(load_sample_images().images[0])
    captions = ["a photo of a cat", "Two birds!", "a dog running fast on the beach"]
    theirs, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.tokenizer.HFTokenizer(str(folder), context_length=16, clean="canonicalize",
                                                local_files_only=True)
    with torch.no_grad():
        images, texts, scale, bias = theirs.eval()(transform(image)[None], tokenizer(captions))
        expected = torch.sigmoid(scale * images @ texts.t() + bias).numpy()
    model = CLIP(model_path=str(folder), phi="auto")
    assert (model.tokenize(captions) == tokenizer(captions)).all()
    probs = model.detect_image(image, captions)
    assert probs.shape == (1, 3) and np.abs(probs - expected).max() <= 1e-4
    assert expected.std() > 1e-3  # scores that differ per caption, not a constant


@pytest.mark.slow
def test_a_siglip_hub_repo_brings_its_tokenizer_files_and_loads_again_without_the_server(tiny_open_clip, env,
                                                                                        monkeypatch, tmp_path):
    from safetensors.torch import save

    from clip import CLIP
    from tests.test_download import _hub_files, serve

    cfg, reference = _tiny_pair(tiny_open_clip, siglip2=False)
    cfg["text_cfg"].update(hf_tokenizer_name="org/siglip", tokenizer_kwargs={"clean": "canonicalize"})
    local = write_tokenizer(tmp_path / "tok")
    files = _hub_files("org/siglip", {
        "open_clip_config.json": json.dumps({"model_cfg": cfg}).encode(),
        "open_clip_model.safetensors": save({k: v.contiguous() for k, v in reference.state_dict().items()}),
        "tokenizer.json": (local / "tokenizer.json").read_bytes(),
        "tokenizer_config.json": (local / "tokenizer_config.json").read_bytes()})
    expected = SiglipTokenizer(local, 16).ids(CAPTIONS)
    with serve(files) as (server, base):
        monkeypatch.setenv("HF_ENDPOINT", base)
        model = CLIP(model_path="hf-hub:org/siglip", phi="auto", onednn=False)
        asked = {r.rsplit("/", 1)[-1] for r in server.requests}
        # tokenizer.json found: no sentencepiece model is asked for.
        assert {"tokenizer.json", "tokenizer_config.json"} <= asked and not asked & {"spiece.model", "tokenizer.model"}
    assert (model.tokenize(CAPTIONS).numpy() == expected).all()
    again = CLIP(model_path="hf-hub:org/siglip", phi="auto", onednn=False)  # the server is gone: the cache serves
    assert (again.tokenize(CAPTIONS).numpy() == expected).all()
