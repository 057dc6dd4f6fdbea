import gzip
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_bytes_to_unicode
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

from utils.tokenizer import (
    DEFAULT_BERT_VOCAB_PATH,
    DEFAULT_BPE_PATH,
    NUM_MERGES,
    BertTokenizer,
    BPETokenizer,
    build_tokenizer,
    bytes_to_unicode,
    clean_text,
)

SOT, EOT = 49406, 49407
CLS, SEP = 101, 102

_rng = random.Random(0)
_WORDS = "a man in red shirt is riding bike down the street while two dogs run beside him".split()
LONG_TEXT = " ".join(_rng.choice(_WORDS) for _ in range(300))

# Strings on which OpenAI's cleaning is a no-op as far as HF's normaliser (NFC, whitespace
# collapse, lowercase) is concerned, so HF must agree on the raw text.
PLAIN_STRINGS = [
    "a photo of a cat",
    "Hello, world! How's it going?... (really) [yes] {no} #tag @user",
    "3.14159 and 1,000,000 and 2024-01-31 12:30",
    "don't, I'll, we're, they've, I'm, he'd, it's",
    "multiple   spaces\n\nnewlines\t\ttabs\r\nand CRLF",
    "UPPERCASE Words MiXeD",
    "",
    "   \n\t ",
    "I love pizza 🍕🎉👍🏽 and flags 🇯🇵",
    "一只猫坐在垫子上。",
    "猫が座っている、日本語のテキスト",
    "القطة تجلس على السجادة",
    "café naïve résumé Ångström São Paulo",
    "e\u0301 written with a combining accent",
    "İstanbul",
    "a\u00a0no-break space, a\u2028line separator and an\u3000ideographic space",
    "<|endoftext|> and <|startoftext|> typed into a caption",
    LONG_TEXT,
]

# HF's fast CLIPTokenizer (the only one in transformers 5) does not run ftfy or
# html.unescape, and its Lowercase normaliser has no final-sigma rule. On these strings
# it therefore tokenises different text than OpenAI does; fed our cleaned text, it must agree.
NEEDS_OPENAI_CLEANING = [
    "Tom &amp; Jerry &lt;3 &quot;hi&quot; &amp;amp; &#39;quoted&#39;",  # html.unescape
    "â€œquotedâ€\x9d",  # ftfy repairs the mojibake to “quoted”, then uncurls the quotes
    "“curly” and ‘single’ quotes",  # ftfy uncurl_quotes
    "ｆｕｌｌｗｉｄｔｈ ｌｅｔｔｅｒｓ，",  # ftfy fix_character_width
    "ﬁne ﬂowers",  # ftfy fix_latin_ligatures
    "ctrl\x00chars\x1b[31m\x7f here",  # ftfy removes control characters and terminal escapes
    "ΟΔΟΣ",  # Python's str.lower gives a final ς; HF's Lowercase gives σ
    "<|ENDOFTEXT|>",  # OpenAI lowercases it into the special token; HF matches specials case-sensitively
]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer()


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    """HF's CLIP tokenizer built from the same merges file, with HF's own byte mapping."""
    directory = tmp_path_factory.mktemp("clip_tokenizer")
    with gzip.open(DEFAULT_BPE_PATH, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : NUM_MERGES + 1]
    byte_chars = list(hf_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += [m.replace(" ", "") for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    # transformers 5 ignores CLIPTokenizer(vocab_file=..., merges_file=...) and builds a
    # 3-token vocabulary; only from_pretrained reads the files.
    tokenizer = CLIPTokenizer.from_pretrained(directory)
    assert len(tokenizer) == 49408
    return tokenizer


@pytest.fixture(scope="module")
def bert() -> BertTokenizer:
    return BertTokenizer(context_length=16)


@pytest.fixture(scope="module")
def hf_bert_slow() -> BertTokenizerLegacy:
    # transformers 5 renamed the pure-Python BertTokenizer to BertTokenizerLegacy; it reads
    # vocab_file itself, so it is an independent reference for the fast tokenizer we wrap.
    return BertTokenizerLegacy(vocab_file=str(DEFAULT_BERT_VOCAB_PATH))


def test_vocabulary_layout(bpe: BPETokenizer) -> None:
    assert bpe.vocab_size == 49408
    assert (bpe.sot_token_id, bpe.eot_token_id, bpe.pad_token_id) == (SOT, EOT, 0)
    assert list(bytes_to_unicode().items()) == list(hf_bytes_to_unicode().items())
    assert bpe.decoder[0] == "!"


def test_known_openai_ids(bpe: BPETokenizer) -> None:
    # Ids published with OpenAI CLIP; pins the vocabulary order independently of HF.
    assert bpe("a photo of a cat")[0, :7].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT]


@pytest.mark.parametrize("text", PLAIN_STRINGS)
def test_matches_hf_clip(bpe: BPETokenizer, hf_clip: CLIPTokenizer, text: str) -> None:
    assert [SOT, *bpe.encode(text), EOT] == hf_clip(text)["input_ids"]


@pytest.mark.parametrize("text", NEEDS_OPENAI_CLEANING)
def test_matches_hf_clip_after_openai_cleaning(bpe: BPETokenizer, hf_clip: CLIPTokenizer, text: str) -> None:
    assert [SOT, *bpe.encode(text), EOT] == hf_clip(clean_text(text))["input_ids"]


def test_cleaning() -> None:
    assert clean_text("â€œquotedâ€\x9d") == '"quoted"'
    assert clean_text("Tom &amp;amp; Jerry") == "tom & jerry"
    assert clean_text("  A\n\tB  ") == "a b"
    assert clean_text("") == ""


def test_empty_string(bpe: BPETokenizer) -> None:
    assert bpe.encode("") == []
    assert bpe("")[0, :3].tolist() == [SOT, EOT, 0]


def test_truncation_keeps_prefix_and_ends_with_eot(bpe: BPETokenizer) -> None:
    full = [SOT, *bpe.encode(LONG_TEXT), EOT]
    assert len(full) > 77
    tokens = bpe(LONG_TEXT)
    assert tokens.shape == (1, 77)
    assert tokens.dtype == torch.long
    assert tokens[0, :76].tolist() == full[:76]
    assert tokens[0, -1].item() == EOT


def test_exact_fit_is_not_truncated(bpe: BPETokenizer) -> None:
    cat = bpe.encode("cat")[0]
    exact = bpe("a " * 74 + "cat")[0].tolist()  # 75 ids + SOT + EOT = 77
    assert exact == [SOT, *[320] * 74, cat, EOT]
    one_over = bpe("a " * 75 + "cat")[0].tolist()
    assert one_over == [SOT, *[320] * 75, EOT]


def test_padding_and_batch(bpe: BPETokenizer) -> None:
    texts = ["a dog", "two dogs play in the snow", "", LONG_TEXT]
    tokens = bpe(texts)
    assert tokens.shape == (4, 77)
    for row, text in zip(tokens.tolist(), texts):
        ids = [SOT, *bpe.encode(text), EOT][:77]
        end = len(ids)
        assert row[end - 1] == EOT
        assert row[: end - 1] == ids[: end - 1]
        assert row[end:] == [0] * (77 - end)
    assert torch.equal(tokens[1:2], bpe(texts[1]))


def test_context_length_default_and_override() -> None:
    tokenizer = BPETokenizer(context_length=32)
    assert tokenizer.context_length == 32
    assert tokenizer("a dog").shape == (1, 32)
    assert tokenizer(["a dog"], context_length=8).shape == (1, 8)
    assert tokenizer([]).shape == (0, 32)


def test_decode_round_trip(bpe: BPETokenizer) -> None:
    text = "a young girl in a pink dress is climbing up a set of stairs"
    assert bpe.decode(bpe.encode(text)) == text
    # A padded row decodes to its caption: SOT is skipped, and EOT ends it (pad 0 is "!").
    assert bpe.decode(bpe(text, context_length=77)[0]) == text


def test_decode_of_row_cut_inside_a_character(bpe: BPETokenizer) -> None:
    text = "猫" * 100
    decoded = bpe.decode(bpe(text)[0])
    assert decoded.startswith("猫" * 10)
    assert set(decoded) <= {"猫", "\ufffd"}


@pytest.mark.parametrize("text", ["一只猫坐在垫子上。", "一个穿红衣服的男孩 riding a BIKE, 2024年!", "", "😀 emoji 和 café"])
def test_bert_matches_slow_reference(bert: BertTokenizer, hf_bert_slow: BertTokenizerLegacy, text: str) -> None:
    expected = hf_bert_slow(text)["input_ids"]
    row = bert(text, context_length=64)[0].tolist()
    assert row[: len(expected)] == expected
    assert row[len(expected) :] == [0] * (64 - len(expected))
    assert bert.encode(text) == expected[1:-1]


def test_bert_truncation_keeps_sep_last(bert: BertTokenizer, hf_bert_slow: BertTokenizerLegacy) -> None:
    text = "一个穿红衣服的男孩在街上骑自行车，旁边有两只狗在跑。" * 3
    expected = hf_bert_slow(text)["input_ids"]
    tokens = bert([text, "猫"])
    assert tokens.shape == (2, 16)
    assert tokens[0].tolist() == expected[:15] + [SEP]
    assert tokens[1].tolist() == [CLS, *hf_bert_slow("猫")["input_ids"][1:-1], SEP] + [0] * 13


def test_bert_attributes(bert: BertTokenizer) -> None:
    assert bert.vocab_size == 21128
    assert (bert.pad_token_id, bert.cls_token_id, bert.sep_token_id) == (0, CLS, SEP)
    assert bert.context_length == 16
    assert bert([]).shape == (0, 16)


def test_bert_custom_vocab(tmp_path: Path) -> None:
    vocab_path = tmp_path / "vocab.txt"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "猫", "狗"]
    vocab_path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    tokenizer = build_tokenizer("bert", 6, vocab_path=vocab_path)
    assert tokenizer.vocab_size == 7
    assert tokenizer("猫狗鸟").tolist() == [[2, 5, 6, 1, 3, 0]]


def test_build_tokenizer() -> None:
    openai = build_tokenizer("openai", 40)
    assert isinstance(openai, BPETokenizer) and openai("a").shape == (1, 40)
    bert = build_tokenizer("bert", 52)
    assert isinstance(bert, BertTokenizer) and bert("猫").shape == (1, 52)


def test_bad_inputs(bpe: BPETokenizer, bert: BertTokenizer) -> None:
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        build_tokenizer("gpt2", 77)
    with pytest.raises(ValueError, match="context_length"):
        BPETokenizer(context_length=1)
    for tokenizer in (bpe, bert):
        with pytest.raises(ValueError, match="context_length"):
            tokenizer("a dog", context_length=0)
        with pytest.raises(TypeError, match="NoneType"):
            tokenizer(["a dog", None])
        with pytest.raises(TypeError):
            tokenizer(3)
    with pytest.raises(FileNotFoundError):
        BPETokenizer("does/not/exist.txt.gz")
