"""open_clip's HFTextEncoder models (RoBERTa, XLM-R, NLLB-200 text towers through transformers; nets/text_hf.py)
against open_clip 3.3: small random-weight models within 1e-4 through a saved open_clip folder and phi="auto", the
tokenizer's ids equal to open_clip's HFTokenizer on the same files, and every real architecture's parameter names and
shapes on the meta device. There is no hub: open_clip's AutoConfig.from_pretrained is given the config.json the hub
holds for each model (scaled down for the forward tests), and the tokenizers are small ones trained here."""
from __future__ import annotations

import json

import pytest
import torch

from nets import build_model, get_config
from nets.configs import TextConfig, UnsupportedArchitectureError
from nets.hf_rows import HF_TEXT_MODELS
from nets.open_clip_configs import from_open_clip
from nets.hf_rows import HF_ROWS
from tests.conftest import write_hf_tokenizer
from utils.tokenizer import HubTokenizer

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

_NLLB_600M, _NLLB_13B = "facebook/nllb-200-distilled-600M", "facebook/nllb-200-distilled-1.3B"
# The hub's config.json of each model (what shapes the network, and the training settings open_clip reads too).
_ROBERTA = dict(model_type="roberta", vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
                eos_token_id=2, hidden_act="gelu", layer_norm_eps=1e-5, hidden_dropout_prob=0.1,
                attention_probs_dropout_prob=0.1, initializer_range=0.02)
_XLMR = dict(_ROBERTA, model_type="xlm-roberta", vocab_size=250002, position_embedding_type="absolute")
_NLLB = dict(model_type="m2m_100", vocab_size=256206, d_model=1024, encoder_layers=12, decoder_layers=12,
             encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
             max_position_embeddings=1024, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
             activation_function="relu", scale_embedding=True, dropout=0.1, attention_dropout=0.1,
             activation_dropout=0.0, encoder_layerdrop=0, decoder_layerdrop=0, init_std=0.02, is_encoder_decoder=True)
HUB_CONFIGS = {
    "roberta-base": _ROBERTA, "xlm-roberta-base": _XLMR,
    "xlm-roberta-large": dict(_XLMR, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                              intermediate_size=4096),
    _NLLB_600M: _NLLB,
    _NLLB_13B: dict(_NLLB, encoder_layers=24, decoder_layers=24, encoder_ffn_dim=8192, decoder_ffn_dim=8192),
}
# The same models scaled down: (hub config.json changes, the row's TextConfig sizes with them).
_TINY_BERT = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                  max_position_embeddings=90)
_TINY_M2M = dict(vocab_size=300, d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=90)
_TINY_SIZES = dict(vocab_size=300, width=64, layers=2, heads=2, intermediate_size=96, max_position_embeddings=90)

# A name timm does not know, standing for a 2-block, 64-wide SigLIP ViT on 32 px (as tests/test_siglip_towers.py).
TINY_TRUNK = "vit_tiny_test_siglip_32"
TINY_OVERRIDES = dict(embed_dim=64, depth=2, num_heads=2, img_size=32, patch_size=8)
_VIT = dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32)
_SIGLIP_VIT = dict(image_size=32, timm_model_name=TINY_TRUNK, timm_model_pretrained=False, timm_pool="map",
                   timm_proj="none")


def _text_cfg(name: str, **kw) -> dict:
    return dict(hf_model_name=name, hf_tokenizer_name=name, **kw)


# open_clip's JSONs of the family at a size the CPU builds in a moment (its defaults: mean_pooler, mlp).
SMALL = {
    "roberta-mean-mlp-quickgelu": dict(embed_dim=32, quick_gelu=True, vision_cfg=_VIT,
                                       text_cfg=_text_cfg("roberta-base", hf_pooler_type="mean_pooler")),
    "xlmr-cls-pooler-linear": dict(embed_dim=32, vision_cfg=_VIT,
                                   text_cfg=_text_cfg("xlm-roberta-base", hf_pooler_type="cls_pooler",
                                                      hf_proj_type="linear")),
    "xlmr-last-hidden-none": dict(embed_dim=64, vision_cfg=_VIT,
                                  text_cfg=_text_cfg("xlm-roberta-large", hf_pooler_type="cls_last_hidden_state_pooler",
                                                     hf_proj_type=None)),
    "nllb-cls-linear": dict(embed_dim=32, vision_cfg=_VIT,
                            text_cfg=_text_cfg(_NLLB_600M, hf_pooler_type="cls_pooler", hf_proj_type="linear")),
    "nllb-siglip": dict(embed_dim=64, custom_text=True, init_logit_bias=-10, vision_cfg=_SIGLIP_VIT,
                        text_cfg=_text_cfg(_NLLB_13B, hf_pooler_type="cls_pooler", hf_proj_type="linear")),
}


class _HubConfigs:
    """open_clip's AutoConfig, answering from_pretrained from `configs` (name -> config.json) instead of the hub."""

    def __init__(self, configs: dict):
        self.configs = configs

    def from_pretrained(self, name, *args, **kwargs):
        return transformers.AutoConfig.for_model(**self.configs[name])


@pytest.fixture
def small_hub(monkeypatch):
    scale_down_hub(monkeypatch)


def scale_down_hub(monkeypatch) -> None:
    """The family's models scaled down: open_clip reads their small config.json, our table their small sizes, and
    timm builds TINY_TRUNK as the small SigLIP ViT."""
    scaled = {name: dict(cfg, **(_TINY_M2M if cfg["model_type"] == "m2m_100" else _TINY_BERT))
              for name, cfg in HUB_CONFIGS.items()}
    monkeypatch.setattr(open_clip.hf_model, "AutoConfig", _HubConfigs(scaled))
    for name in HUB_CONFIGS:
        monkeypatch.setitem(HF_TEXT_MODELS, name, dict(HF_TEXT_MODELS[name], **_TINY_SIZES))
    real_create = timm.create_model

    def create(name, *args, **kwargs):
        if name == TINY_TRUNK:
            return real_create("vit_base_patch16_siglip_224", *args, **{**kwargs, **TINY_OVERRIDES})
        return real_create(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)


def _reference(name: str, cfg: dict, monkeypatch) -> torch.nn.Module:
    """open_clip's model of `cfg`, every parameter moved off transformers' and timm's init (norms, biases too)."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, name, cfg)
    model = open_clip.create_model(name, pretrained=None, pretrained_text=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _tokens(pad: int, first: int, seed: int = 1) -> torch.Tensor:
    """Captions as the tokenizers give them: `first` (<s>, or NLLB's language code), ids, </s> (2), then `pad`."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((4, 77), pad)
    for row, length in enumerate((5, 12, 1, 30)):
        tokens[row, 0] = first
        tokens[row, 1:length + 1] = torch.randint(4, 300, (length,), generator=g)
        tokens[row, length + 1] = 2
    return tokens


@pytest.mark.parametrize("case", list(SMALL))
def test_small_models_give_open_clips_features_within_1e_4_and_load_its_keys(small_hub, monkeypatch, case):
    cfg = SMALL[case]
    reference = _reference(f"tiny-{case}", cfg, monkeypatch)
    config = from_open_clip(cfg)
    assert config.text.kind == "hf"
    ours = build_model(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(reference.state_dict())
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    tokens = _tokens(pad=1, first=299 if "nllb" in case else 0)
    with torch.no_grad():
        theirs = reference.encode_image(pixels), reference.encode_text(tokens)
        mine = ours.encode_image(pixels), ours.encode_text(tokens)
        for a, b in zip(mine, theirs):
            assert (a - b).abs().max() < 1e-4
            assert b.abs().max() > 1e-2
        print(f"\n{case}: max |ours - open_clip| image {(mine[0] - theirs[0]).abs().max():.1e}, "
              f"text {(mine[1] - theirs[1]).abs().max():.1e}")
        # The mask matters: the same captions with the padding attended (pad id 0 masks nothing here) are far off.
        ours.text.pad_id = 0
        assert (ours.encode_text(tokens) - theirs[1]).abs().max() > 1e-3


def _open_clip_folder(folder, cfg, reference, tokenizer_folder):
    folder.mkdir()
    for f in tokenizer_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.save(reference.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


CAPTIONS = ["A photo of the DOG", "two red cars on a  small tree house &amp; a bird", "", "cat " * 90,
            "ein Foto von einem Hund"]


@pytest.mark.parametrize("case, tokenizer", [("roberta-mean-mlp-quickgelu", "bpe"), ("nllb-siglip", "nllb")])
def test_an_open_clip_folder_loads_with_auto_and_gives_open_clips_features_on_a_photo(small_hub, monkeypatch,
                                                                                     tokenizers_made, tmp_path, case,
                                                                                     tokenizer):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from clip import CLIP

    cfg = SMALL[case]
    reference = _reference(f"tiny-{case}", cfg, monkeypatch)
    folder = _open_clip_folder(tmp_path / "hub", cfg, reference, tokenizers_made[tokenizer])
    model = CLIP(model_path=str(folder), phi="auto", cuda=False)
    assert model.net.config == from_open_clip(cfg) and isinstance(model.tokenizer, HubTokenizer)
    photo = Image.fromarray(load_sample_images().images[1])
    transform = open_clip.image_transform(32, is_train=False)
    theirs_tokens = open_clip.tokenizer.HFTokenizer(str(folder), context_length=77)(CAPTIONS)
    with torch.no_grad():
        theirs = reference.encode_image(transform(photo)[None]), reference.encode_text(theirs_tokens)
        mine = model.detect_image_for_eval(images=[photo], texts=CAPTIONS)
    for a, b in zip(mine, theirs):
        assert (a - b).abs().max() < 1e-4
    from utils.export.hf import refusal

    assert "transformers has no CLIP class" in refusal(model.net.config)
    print(f"\n{case}: max |ours - open_clip| image {(mine[0] - theirs[0]).abs().max():.1e}, "
          f"text {(mine[1] - theirs[1]).abs().max():.1e}")


_CORPUS = ["a photo of a dog", "two red cars on a small tree house", "a bird in a tree", "the cat and the dog",
           "ein Foto von einem Hund", "une photo d'un chat", "picture of a man with a blue car"] * 5


def _bpe_tokenizer():
    """A byte-level BPE in RoBERTa's form: <s> 0, <pad> 1, </s> 2, <unk> 3, <mask> 4; <s> text </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return tok, dict(tokenizer_class="RobertaTokenizer", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                     unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")


def _nllb_tokenizer():
    """A unigram model in NLLB's form: <s> 0, <pad> 1, </s> 2, <unk> 3; the language code first: eng_Latn text </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(_CORPUS, trainers.UnigramTrainer(vocab_size=200, unk_token="<unk>",
                                                             special_tokens=["<s>", "<pad>", "</s>", "<unk>"]))
    lang = tok.get_vocab_size()
    tok.add_special_tokens(["eng_Latn"])
    tok.post_processor = processors.TemplateProcessing(single="eng_Latn $A </s>",
                                                       special_tokens=[("eng_Latn", lang), ("</s>", 2)])
    return tok, dict(tokenizer_class="PreTrainedTokenizerFast", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                     unk_token="<unk>")


@pytest.fixture(scope="session")
def tokenizers_made(tmp_path_factory):
    return {kind: write_hf_tokenizer(tmp_path_factory.mktemp(kind), *make())
            for kind, make in (("bpe", _bpe_tokenizer), ("nllb", _nllb_tokenizer))}


@pytest.mark.parametrize("name, kind", [("roberta-base", "bpe"), (_NLLB_600M, "nllb")])
def test_tokenizer_ids_equal_open_clips_hf_tokenizer_on_the_same_files(tokenizers_made, name, kind):
    folder = tokenizers_made[kind]
    tokenizer = HubTokenizer(name, folder, 77)
    ours = tokenizer(CAPTIONS)
    theirs = open_clip.tokenizer.HFTokenizer(str(folder), context_length=77)(CAPTIONS)
    assert torch.equal(ours, theirs) and ours.shape == (len(CAPTIONS), 77)
    assert (ours[:, -1] == 1).sum() == len(CAPTIONS) - 1 and ours[3, -1] == 2  # padded with 1; the long one cut, </s> last
    first = tokenizer.tokenizer.convert_tokens_to_ids("<s>" if kind == "bpe" else "eng_Latn")
    assert (ours[:, 0] == first).all() and first == (0 if kind == "bpe" else tokenizer.vocab_size - 1)


@pytest.fixture(scope="module")
def nllb_folder(tmp_path_factory):
    """transformers' own NllbTokenizer (FLORES-200's language codes as its special tokens) over a small vocabulary,
    saved as a weights repo holds it."""
    from transformers import NllbTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate("▁ a p h o t ▁a ▁photo ▁of ▁dog ▁une ▁d'un ▁chat".split())})
    folder = tmp_path_factory.mktemp("nllb")
    NllbTokenizer(vocab=vocab, merges=[]).save_pretrained(str(folder))
    return folder


def test_text_language_is_each_captions_first_token_as_transformers_src_lang_gives_it(nllb_folder):
    from transformers import AutoTokenizer

    default = HubTokenizer(_NLLB_600M, nllb_folder, 16)(["a photo of a dog", "une photo d'un chat"])
    french = HubTokenizer(_NLLB_600M, nllb_folder, 16, language="fra_Latn")
    theirs = AutoTokenizer.from_pretrained(str(nllb_folder), src_lang="fra_Latn")
    ids = french(["a photo of a dog", "une photo d'un chat"])
    want = theirs(["a photo of a dog", "une photo d'un chat"], max_length=16, truncation=True, padding="max_length")
    assert ids.tolist() == want["input_ids"]
    assert (ids[:, 0] == theirs.convert_tokens_to_ids("fra_Latn")).all()
    assert (default[:, 0] == theirs.convert_tokens_to_ids("eng_Latn")).all() and torch.equal(default[:, 1:], ids[:, 1:])
    french(["again"])  # the setting holds from call to call
    assert french(["une photo d'un chat"])[0, 0] == ids[1, 0]


def test_an_onnx_exports_tokenizer_keeps_its_text_language(nllb_folder):
    from utils.export.onnx_predict import _tokenizer

    config = {"tokenizer": "hub", "hub_tokenizer": _NLLB_600M, "context_length": 16, "strip_sep_token": False}
    french = HubTokenizer(_NLLB_600M, nllb_folder, 16, language="fra_Latn")
    assert french.language == "fra_Latn" and HubTokenizer(_NLLB_600M, nllb_folder, 16).language is None
    exported = _tokenizer({**config, "text_language": french.language}, nllb_folder)
    assert torch.equal(exported(["une photo d'un chat"]), french(["une photo d'un chat"]))
    older = _tokenizer(config, nllb_folder)  # an export made before text_language: the default, eng_Latn
    assert older(["a dog"])[0, 0] == older.tokenizer.convert_tokens_to_ids("eng_Latn")


def test_a_text_language_that_cannot_apply_is_one_line_naming_it(nllb_folder, tokenizers_made):
    from nets import get_config
    from utils.errors import UserError
    from utils.tokenizer import text_tokenizer

    with pytest.raises(UserError, match="'fr' is not one of .* language codes: FLORES-200 codes such as eng_Latn"):
        HubTokenizer(_NLLB_600M, nllb_folder, 16, language="fr")
    with pytest.raises(UserError, match="roberta-base's tokenizer has no source language"):
        HubTokenizer("roberta-base", tokenizers_made["bpe"], 16, language="fra_Latn")
    with pytest.raises(UserError, match="only NLLB text towers take a source language; this model's tokenizer is "
                                        "openai's"):
        text_tokenizer(get_config("tiny/VIT-T-8").text, None, language="fra_Latn")


def test_clip_and_the_scripts_pass_text_language_to_the_tokenizer(capsys):
    from clip import CLIP
    from tests.conftest import run_script
    from utils.errors import UserError

    with pytest.raises(UserError, match="text_language 'fra_Latn': only NLLB"):
        CLIP(model_path="", phi="tiny/VIT-T-8", cuda=False, text_language="fra_Latn")
    for script in ("predict.py", "eval.py", "train.py"):
        result = run_script(script, "--help", capsys=capsys)
        assert "text_language" in result.stdout, script


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HF_ROWS))
def test_every_real_architecture_has_open_clips_parameter_names_and_shapes(monkeypatch, name):
    monkeypatch.setattr(open_clip.hf_model, "AutoConfig", _HubConfigs(HUB_CONFIGS))
    with torch.device("meta"):  # shapes only: nothing is allocated
        theirs = open_clip.create_model(name, pretrained=None, pretrained_text=False, device="meta").state_dict()
        ours = build_model(get_config(name)).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_each_row_is_open_clips_json():
    import os

    folder = os.path.join(os.path.dirname(open_clip.__file__), "model_configs")
    for name in HF_ROWS:
        with open(os.path.join(folder, f"{name}.json")) as f:
            assert from_open_clip(json.load(f)) == get_config(name), name


def test_a_rows_record_round_trips_and_keeps_its_sizes():
    config = get_config("nllb-clip-large-siglip")
    assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config
    text = config.text
    assert (text.hf_family, text.width, text.layers, text.intermediate_size, text.pad_id) == ("m2m_100", 1024, 24,
                                                                                              8192, 1)
    assert TextConfig(**{k: v for k, v in get_config("ViT-B-32").text.__dict__.items()
                         if k not in ("hf_family", "hf_pooler", "hf_proj", "pad_id")}) == get_config("ViT-B-32").text


@pytest.mark.parametrize("change, named", [
    (dict(hf_model_name="bert-base-uncased"), "hf_model_name"),
    (dict(hf_pooler_type="max_pooler"), "hf_pooler_type"),
    (dict(hf_proj_type="none"), "hf_proj_type"),
    (dict(hf_tokenizer_name="gpt2"), "hf_tokenizer_name"),
    (dict(output_tokens=True), "output_tokens"),
])
def test_hf_settings_not_built_here_are_refused_by_name(change, named):
    cfg = dict(SMALL["roberta-mean-mlp-quickgelu"])
    cfg["text_cfg"] = dict(cfg["text_cfg"], **change)
    with pytest.raises(UnsupportedArchitectureError) as e:
        from_open_clip(cfg)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_a_bare_state_dict_of_an_hf_text_tower_asks_for_its_config_in_one_line():
    from nets.shape_config import UnknownHeadsError, infer_config

    with torch.device("meta"):
        state = build_model(get_config("nllb-clip-base")).state_dict()
    with pytest.raises(UnknownHeadsError) as e:
        infer_config(state)
    assert "open_clip_config.json" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case, attention", [
    ("roberta-mean-mlp-quickgelu", ("attention.self.query", "attention.self.key", "attention.self.value",
                                    "attention.output.dense")),
    ("nllb-cls-linear", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")),
])
def test_lora_wraps_each_layers_attention_projections_and_merges_back_within_1e_5(small_hub, case, attention):
    from peft.tuners.lora import LoraLayer

    from utils.finetune.lora import add_lora, plain_state_dict

    config = from_open_clip(SMALL[case])
    torch.manual_seed(0)
    model = build_model(config).eval()
    tokens = _tokens(pad=1, first=299 if "nllb" in case else 0)
    with torch.no_grad():
        base = model.encode_text(tokens)
    add_lora(model, dict(lock_image=True, lock_text=False, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                         lora_targets=["attn"]))
    layers = model.text.transformer.encoder.layer if "roberta" in case else model.text.transformer.layers
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    prefix = "text.transformer.encoder.layer" if "roberta" in case else "text.transformer.layers"
    assert wrapped == {f"{prefix}.{i}.{a}" for i in range(len(layers)) for a in attention}
    for name, p in model.named_parameters():
        if "lora_B" in name:  # trained adapters: B is no longer zero
            torch.nn.init.normal_(p, std=0.5)
    merged = build_model(config).eval()
    merged.load_state_dict(plain_state_dict(model), strict=True)  # open_clip's keys, no adapter left
    with torch.no_grad():
        adapted, plain = model.encode_text(tokens), merged.encode_text(tokens)
    torch.testing.assert_close(plain, adapted, atol=1e-5, rtol=0)
    assert (adapted - base).abs().max() > 1e-2  # the adapters changed the features: the comparison means something


@pytest.mark.parametrize("case, last", [("xlmr-cls-pooler-linear", ("transformer.encoder.layer.1.", "transformer.pooler.")),
                                        ("nllb-cls-linear", ("transformer.layers.1.", "transformer.layer_norm."))])
def test_text_locks_name_the_towers_groups(small_hub, case, last):
    from utils.finetune.partial import apply_locks, text_groups

    model = build_model(from_open_clip(SMALL[case]))
    cfg = dict(lock_image=True, lock_image_unlocked_groups=0, lock_text=True, lock_layer_norm=True)
    apply_locks(model, dict(cfg, lock_text_unlocked_layers=2))  # the last layer (with the final norm / pooler), proj
    trainable = {n for n, p in model.text.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trainable} == {"transformer", "proj"}
    assert all(n.startswith((*last, "proj.")) for n in trainable) and any(n.startswith(last[1]) for n in trainable)
    assert len(text_groups(model.text)) == 2 + 2  # the embeddings, 2 layers, the projection
    apply_locks(model, dict(cfg, lock_text_unlocked_layers=0, lock_layer_norm=False))  # only LayerNorms train
    trainable = {n for n, p in model.text.named_parameters() if p.requires_grad}
    assert trainable and all("LayerNorm" in n or "layer_norm" in n for n in trainable)


def _toy_and_hub_folder(tmp_path, monkeypatch, case: str, tokenizer_folder):
    """The toy set (8 training, 4 validation images) and an open_clip folder of SMALL[case] to fine-tune."""
    from utils.data.toy import make_toy_dataset

    toy = tmp_path / "toy"
    make_toy_dataset(toy, n_train=8, n_val=4, seed=1)
    cfg = SMALL[case]
    return toy, _open_clip_folder(tmp_path / "hub", cfg, _reference(f"tiny-{case}", cfg, monkeypatch), tokenizer_folder)


@pytest.mark.slow
def test_train_py_fine_tunes_an_hf_text_model_with_its_tokenizer_and_saves_it_beside_the_weights(
        small_hub, monkeypatch, tokenizers_made, tmp_path, capsys):
    from clip import CLIP
    from tests.test_training import train, train_args

    cfg = SMALL["roberta-mean-mlp-quickgelu"]
    toy, folder = _toy_and_hub_folder(tmp_path, monkeypatch, "roberta-mean-mlp-quickgelu", tokenizers_made["bpe"])
    save_dir = tmp_path / "run"
    train(train_args(toy, save_dir, phi="auto", model_path=folder, Epoch=1, eval_flag="false",
                     lock_text=True, lock_text_unlocked_layers=1), capsys)
    assert (save_dir / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    model = CLIP(model_path=str(save_dir / "last_epoch_weights.pth"), phi="auto", cuda=False)
    assert model.net.config == from_open_clip(cfg) and isinstance(model.tokenizer, HubTokenizer)
    saved = model.net.state_dict()
    before = torch.load(folder / "open_clip_pytorch_model.bin")
    # the locked text tower's body is as it was; its projection (the one unlocked group) trained
    assert torch.equal(saved["text.transformer.encoder.layer.0.attention.self.query.weight"],
                       before["text.transformer.encoder.layer.0.attention.self.query.weight"])
    assert not torch.equal(saved["text.proj.0.weight"], before["text.proj.0.weight"])


@pytest.mark.slow
def test_a_runs_text_language_is_saved_with_its_weights_and_asked_in_where_none_is_given(
        small_hub, monkeypatch, nllb_folder, tmp_path, capsys):
    from clip import CLIP
    from tests.test_training import train, train_args
    from utils.errors import UserError
    from utils.train.checkpoint import newest_state
    from utils.weights.arch import arch_path

    toy, folder = _toy_and_hub_folder(tmp_path, monkeypatch, "nllb-cls-linear", nllb_folder)
    first = tmp_path / "fr"
    # Its architecture is no table row (phi "custom"): the WiSE-FT blend rebuilds the start from phi="auto" too.
    result = train(train_args(toy, first, phi="auto", model_path=folder, Epoch=1, eval_flag="false",
                              text_language="fra_Latn", wise_ft_alpha=0.5), capsys)
    assert result.returncode == 0, result.stderr[-500:]

    weights = first / "last_epoch_weights.pth"
    for saved in (weights, first / "wise_ft_alpha0.5_weights.pth"):
        assert json.loads(arch_path(saved).read_text())["text_language"] == "fra_Latn", saved.name
    code = HubTokenizer(_NLLB_600M, nllb_folder, 16).tokenizer.convert_tokens_to_ids
    for given in (weights, newest_state(first)):  # the record beside the weights; the training state's own
        model = CLIP(model_path=str(given), phi="auto", cuda=False)
        assert model.tokenizer.language == "fra_Latn" and (model.tokenize(["une photo"])[:, 0] == code("fra_Latn")).all()
        assert "text_language fra_Latn: recorded with the weights" in capsys.readouterr().out
    asked = CLIP(model_path=str(weights), phi="auto", cuda=False, text_language="deu_Latn")  # the setting wins
    assert asked.tokenize(["ein Foto"])[0, 0] == code("deu_Latn")
    record = json.loads(arch_path(weights).read_text())
    arch_path(weights).write_text(json.dumps({**record, "text_language": 7}))
    with pytest.raises(UserError, match="text_language 7 is not a language code like 'fra_Latn'"):
        CLIP(model_path=str(weights), phi="auto", cuda=False)
    arch_path(weights).write_text(json.dumps(record))
    # Fine-tuned again without the setting: the run goes on in French, and says so.
    again = tmp_path / "again"
    result = train(train_args(toy, again, phi="auto", model_path=weights, Epoch=1, eval_flag="false"), capsys)
    assert "text_language fra_Latn: recorded with the weights" in result.stdout
    assert json.loads(arch_path(again / "last_epoch_weights.pth").read_text())["text_language"] == "fra_Latn"
    # Resumed without the setting: the state's language goes on, and the resume does not call it a change.
    resumed = tmp_path / "resumed"
    common = dict(phi="auto", model_path=folder, Epoch=2, eval_flag="false")
    train(train_args(toy, resumed, **common, text_language="fra_Latn", stop_after_steps=1), capsys)
    result = train(train_args(toy, resumed, **common, resume="auto"), capsys)
    assert result.returncode == 0 and "text_language:" not in result.stdout, result.stdout[-800:]
    assert json.loads(arch_path(resumed / "last_epoch_weights.pth").read_text())["text_language"] == "fra_Latn"


@pytest.mark.parametrize("case", ["roberta-mean-mlp-quickgelu", "nllb-cls-linear"])
def test_gradient_checkpointing_gives_the_same_gradients(small_hub, case):
    from dataclasses import replace

    config = from_open_clip(SMALL[case])
    config = replace(config, text=replace(config.text, dropout=0.0))  # training mode, the same math both times
    tokens = _tokens(pad=1, first=299 if "nllb" in case else 0)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        text = build_model(config).text.train()  # transformers checkpoints in training mode only
        text.set_grad_checkpointing(checkpointing)
        assert text.transformer.is_activation_checkpointing == checkpointing
        text(tokens).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in text.parameters() if p.grad is not None]))
    assert torch.allclose(*grads, atol=1e-6) and grads[0].abs().max() > 0
