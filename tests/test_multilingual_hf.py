"""transformers' multilingual CLIP folders with phi="auto": MetaClip2Model (OpenAI's towers over XLM-V, first-</s>
pooling) and AltCLIPModel (XLM-R text tower, nets/text_altclip.py). Small random models saved with save_pretrained
and an XLM-R-style tokenizer give transformers' get_image_features / get_text_features within 1e-4."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_worldwide import VOCAB, xlm_tokenizer_folder
from utils.data.preprocess import Preprocess
from utils.errors import UserError

transformers = pytest.importorskip("transformers")

CAPTIONS = ["a photo of the dog", "这是一张猫的照片", "two red cars on a big tree", "", "cat " * 100]
_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
               patch_size=8, hidden_act="quick_gelu")


def _moved(model):
    """`model` with every parameter moved off its init (LayerNorm gains, biases, embeddings too)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def tiny_metaclip2() -> "transformers.MetaClip2Model":
    config = transformers.MetaClip2Config(
        text_config=dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", pad_token_id=1,
                         bos_token_id=0, eos_token_id=2),
        vision_config=_VISION, projection_dim=32)
    torch.manual_seed(0)
    return _moved(transformers.MetaClip2Model(config))


def tiny_altclip() -> "transformers.AltCLIPModel":
    config = transformers.AltCLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=80, project_dim=40, type_vocab_size=1),
        vision_config=_VISION, projection_dim=32)
    torch.manual_seed(0)
    return _moved(transformers.AltCLIPModel(config))


def save_folder(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    # Squashed: transformers' centre crop is a column off torchvision's on these photos (tests/test_preprocess.py).
    record = Preprocess(interpolation="bilinear", resize_mode="squash")
    transformers.CLIPImageProcessor(**record.to_transformers(32)).save_pretrained(folder)
    return xlm_tokenizer_folder(folder)


def _photos():
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(a) for a in load_sample_images().images]


def _compare(model, folder: Path) -> tuple[float, float]:
    from clip import CLIP

    ours = CLIP(model_path=str(folder), phi="auto", cuda=False, precision="fp32", fast_decode=False)
    photos = _photos()
    tokens = ours.tokenize(CAPTIONS)
    # transformers' own tokenizer of the folder gives the same ids (the captions need no cleaning).
    hf_tokens = transformers.AutoTokenizer.from_pretrained(folder)(CAPTIONS, padding="max_length", truncation=True,
                                                                   max_length=tokens.shape[1],
                                                                   return_tensors="pt")["input_ids"]
    assert torch.equal(tokens, hf_tokens)
    pixels = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")(images=photos,
                                                                                    return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image, text = ours.detect_image_for_eval(photos, CAPTIONS)
        theirs_image = model.get_image_features(pixel_values=pixels).pooler_output
        theirs_text = model.get_text_features(input_ids=tokens, attention_mask=(tokens != 1).long()).pooler_output
    worst = []
    for a, b in ((image, theirs_image), (text, theirs_text)):
        assert a.shape == b.shape and b.abs().max() > 1e-2
        worst.append((a.float() - b).abs().max().item())
    assert max(worst) < 1e-4, worst
    return tuple(worst)


def test_a_metaclip2_folder_loads_with_auto_and_gives_transformers_features_within_1e_4(tmp_path):
    model = tiny_metaclip2()
    folder = save_folder(model, tmp_path / "metaclip2")
    _compare(model, folder)
    from clip import CLIP

    text = CLIP(model_path=str(folder), phi="auto", cuda=False).net.config.text
    assert (text.kind, text.pool, text.eos_id, text.tokenizer) == ("openai", "eos", 2, "facebook/xlm-v-base")


def test_an_altclip_folder_loads_with_auto_and_gives_transformers_features_within_1e_4(tmp_path):
    model = tiny_altclip()
    folder = save_folder(model, tmp_path / "altclip")
    _compare(model, folder)
    from clip import CLIP

    ours = CLIP(model_path=str(folder), phi="auto", cuda=False)
    text = ours.net.config.text
    assert (text.kind, text.project_dim, text.context_length) == ("altclip", 40, 78)  # 80 positions from <pad> + 1
    # Padding is masked out and trimmed: a caption's features do not depend on the batch it comes in.
    with torch.no_grad():
        alone = ours.detect_image_for_eval(texts=CAPTIONS[:1])[1]
        batched = ours.detect_image_for_eval(texts=CAPTIONS)[1][:1]
    assert (alone - batched).abs().max() < 1e-5


def test_a_metaclip2_folder_of_another_tokenizer_is_refused_in_one_line(tmp_path):
    from clip import CLIP

    model = tiny_metaclip2()
    model.config.text_config.eos_token_id = 1  # mT5's </s>
    folder = save_folder(model, tmp_path / "mt5")
    with pytest.raises(UserError) as e:
        CLIP(model_path=str(folder), phi="auto", cuda=False)
    assert "\n" not in str(e.value) and "eos_token_id is 1" in str(e.value)


def test_an_altclip_folder_with_only_xlm_rs_sentencepiece_model_tokenizes_as_transformers(tmp_path):
    """XLM-R's repos hold sentencepiece.bpe.model, which transformers converts where there is no tokenizer.json."""
    import io
    import json

    spm = pytest.importorskip("sentencepiece")
    from clip import CLIP

    model = tiny_altclip()
    folder = tmp_path / "altclip"
    model.save_pretrained(folder)
    record = Preprocess(interpolation="bilinear", resize_mode="squash")
    transformers.CLIPImageProcessor(**record.to_transformers(32)).save_pretrained(folder)
    written = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CAPTIONS[:4] * 20), model_writer=written, vocab_size=40,
                                   model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
                                   hard_vocab_limit=False)
    (folder / "sentencepiece.bpe.model").write_bytes(written.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "XLMRobertaTokenizer"}))
    ours = CLIP(model_path=str(folder), phi="auto", cuda=False)
    tokens = ours.tokenize(CAPTIONS)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)(CAPTIONS, padding="max_length", truncation=True,
                                                                max_length=tokens.shape[1], return_tensors="pt")
    assert torch.equal(tokens, theirs["input_ids"]) and (tokens[:, 0] == 0).all()
    with torch.no_grad():
        expected = model.get_text_features(**theirs).pooler_output
        assert (ours.detect_image_for_eval(texts=CAPTIONS)[1] - expected).abs().max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("make", [tiny_altclip, tiny_metaclip2], ids=["altclip", "metaclip2"])
def test_train_py_fine_tunes_a_multilingual_folder_and_saves_its_tokenizer_beside_the_weights(tmp_path, make):
    from clip import CLIP
    from tests.test_training import train, train_args
    from utils.data.toy import make_toy_dataset
    from utils.tokenizer import HubTokenizer

    make_toy_dataset(tmp_path / "toy", n_train=8, n_val=4, seed=1)
    folder = save_folder(make(), tmp_path / "hf")
    start = CLIP(model_path=str(folder), phi="auto", cuda=False)
    save_dir = tmp_path / "run"
    train(train_args(tmp_path / "toy", save_dir, phi="auto", model_path=folder, Epoch=1, eval_flag="false"))
    assert (save_dir / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    tuned = CLIP(model_path=str(save_dir / "last_epoch_weights.pth"), phi="auto", cuda=False)
    assert tuned.net.config == start.net.config and isinstance(tuned.tokenizer, HubTokenizer)
    assert torch.equal(tuned.tokenize(CAPTIONS), start.tokenize(CAPTIONS))
