"""Text tokenizers for the CLIP text towers.

`BPETokenizer` reproduces OpenAI CLIP's byte-level BPE exactly (same cleaning, same
pre-tokenisation regex, same ids), so OpenAI weights see the ids they were trained on.
`BertTokenizer` wraps the `transformers` WordPiece tokenizer for Chinese BERT text towers.
`SiglipTokenizer` reads SigLIP's sentencepiece tokenizer from the files beside its weights, as open_clip's
`HFTokenizer(clean='canonicalize')` does.
Both return a zero-padded (N, context_length) LongTensor from `__call__`, and the same ids as an int64 numpy
array from `ids` (no torch needed: the ONNX predictor tokenizes with it).
"""
from __future__ import annotations

import gzip
import html
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import ftfy
import numpy as np
import regex

from utils.errors import UserError

if TYPE_CHECKING:
    import torch

    from nets.configs import TextConfig

MODEL_DATA = Path(__file__).resolve().parents[1] / "model_data"
DEFAULT_BPE_PATH = MODEL_DATA / "bpe_simple_vocab_16e6.txt.gz"
DEFAULT_BERT_VOCAB_PATH = MODEL_DATA / "bert-base-chinese-vocab.txt"

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# OpenAI trained with 49408 ids: 512 byte tokens, the merges, then SOT and EOT. The merges
# file holds more merges than that, so only the first 49152 - 256 - 2 are used.
NUM_MERGES = 49152 - 256 - 2

# OpenAI's pre-tokenisation pattern, verbatim: the special tokens, common English
# contractions, runs of letters, single digits, and runs of other non-space characters.
_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable character, so BPE can work on strings without
    whitespace or control characters. Printable latin-1 bytes map to themselves; the
    rest are shifted to code points 256 and up. The insertion order (printable bytes
    first) is the order of the first 256 vocabulary ids, so id 0 is "!"."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def clean_text(text: str) -> str:
    """OpenAI's cleaning: repair mojibake and entities, collapse whitespace, lowercase."""
    text = ftfy.fix_text(text)
    # Scraped captions are often escaped twice ("&amp;amp;"), hence two passes.
    text = html.unescape(html.unescape(text))
    return _WHITESPACE.sub(" ", text.strip()).strip().lower()


def _as_text_list(texts: str | Sequence[str]) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"expected str or a sequence of str, got elements of type {bad[0]}")
    return texts


def _check_context_length(context_length: int) -> int:
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 to hold the start and end tokens, got {context_length}")
    return context_length


class BPETokenizer:
    """OpenAI CLIP's byte-level BPE tokenizer; ids match `clip.tokenize(..., truncate=True)`."""

    def __init__(self, vocab_path: str | Path | None = None, context_length: int = 77) -> None:
        self.context_length = _check_context_length(context_length)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: b for b, char in self.byte_encoder.items()}

        with gzip.open(vocab_path or DEFAULT_BPE_PATH, "rt", encoding="utf-8") as f:
            # Line 0 is a version header, not a merge.
            merges = [tuple(line.split()) for line in f.read().split("\n")[1 : NUM_MERGES + 1]]
        byte_chars = list(self.byte_encoder.values())
        vocab = byte_chars + [c + END_OF_WORD for c in byte_chars]
        vocab += ["".join(pair) for pair in merges] + [SOT_TOKEN, EOT_TOKEN]

        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.vocab_size = len(vocab)
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]
        # Id 0 is also the "!" token; padding is told apart only by coming after EOT.
        self.pad_token_id = 0
        # Caption vocabularies are small, so every word's ids are kept once computed.
        # The special tokens are seeded so that their literal text in a caption maps to
        # their ids, as OpenAI's code does.
        self._word_cache: dict[str, tuple[int, ...]] = {
            SOT_TOKEN: (self.sot_token_id,),
            EOT_TOKEN: (self.eot_token_id,),
        }

    def _bpe(self, byte_chars: str) -> tuple[int, ...]:
        """Ids for one pre-tokenised word, given as byte characters."""
        parts = [*byte_chars[:-1], byte_chars[-1] + END_OF_WORD]
        while len(parts) > 1:
            pairs = zip(parts, parts[1:])
            best = min(pairs, key=lambda pair: self.merge_ranks.get(pair, float("inf")))
            if best not in self.merge_ranks:
                break
            # Merge every occurrence left to right; in "a a a" only the first two join.
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self.encoder[part] for part in parts)

    def encode(self, text: str) -> list[int]:
        """Token ids for `text`, without the start and end tokens."""
        ids: list[int] = []
        for word in _WORD_PATTERN.findall(clean_text(text)):
            word_ids = self._word_cache.get(word)
            if word_ids is None:
                byte_chars = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                word_ids = self._word_cache[word] = self._bpe(byte_chars)
            ids.extend(word_ids)
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text for `ids`. The start token is skipped and everything from the first end
        token on is dropped, so a padded row from `__call__` decodes to its caption."""
        if hasattr(ids, "tolist"):  # a tensor or an array
            ids = ids.tolist()
        tokens = []
        for i in ids:
            if i == self.eot_token_id:
                break
            if i != self.sot_token_id:
                tokens.append(self.decoder[i])
        raw = bytes(self.byte_decoder[c] for c in "".join(tokens))
        # A word may be cut mid-character by truncation, so undecodable bytes are replaced.
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        import torch

        return torch.from_numpy(self.ids(texts, context_length))

    def ids(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """(N, context_length) int64 ids: SOT, text, EOT, then zeros. Over-long texts are cut
        and their last kept token replaced by EOT, which the text tower pools at."""
        texts = _as_text_list(texts)
        context_length = _check_context_length(self.context_length if context_length is None else context_length)
        rows = []
        for text in texts:
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot_token_id
            rows.append(ids + [self.pad_token_id] * (context_length - len(ids)))
        # One array from padded lists is several times faster than filling rows one by one.
        return np.array(rows, dtype=np.int64).reshape(len(texts), context_length)


class _PaddedTransformersTokenizer:
    """A transformers tokenizer (`self.tokenizer`) cut and padded to `self.context_length`: BERT's and SigLIP's,
    which differ only in how a caption is cleaned first (`clean`)."""

    context_length: int

    def clean(self, text: str) -> str:
        return text

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        import torch

        return torch.from_numpy(self.ids(texts, context_length))

    def ids(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """(N, context_length) int64 ids: the tokenizer's own special tokens around the cleaned text, truncated and
        padded to the full length (BERT: [CLS], text, [SEP], [PAD]; over-long texts keep [SEP] last)."""
        texts = _as_text_list(texts)
        context_length = _check_context_length(self.context_length if context_length is None else context_length)
        if not texts:
            return np.zeros((0, context_length), dtype=np.int64)
        encoded = self.tokenizer([self.clean(t) for t in texts], max_length=context_length, truncation=True,
                                 padding="max_length")
        return np.array(encoded["input_ids"], dtype=np.int64).reshape(len(texts), context_length)


class BertTokenizer(_PaddedTransformersTokenizer):
    """WordPiece tokenizer for Chinese BERT text towers, built from a local vocab file."""

    def __init__(self, vocab_path: str | Path | None = None, context_length: int = 77) -> None:
        # Imported here so that OpenAI-only runs do not pay for importing transformers.
        from transformers import BertTokenizerFast

        self.context_length = _check_context_length(context_length)
        with open(vocab_path or DEFAULT_BERT_VOCAB_PATH, encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        # transformers 5 ignores `vocab_file=` outside `from_pretrained` and silently builds
        # a 5-token vocabulary, so the vocabulary is passed in as a dict.
        self.tokenizer = BertTokenizerFast(vocab=vocab)
        if len(self.tokenizer) != len(vocab):
            raise RuntimeError(f"BERT tokenizer has {len(self.tokenizer)} tokens, vocab file has {len(vocab)}")
        self.vocab_size = len(self.tokenizer)
        self.pad_token_id = self.tokenizer.pad_token_id
        self.cls_token_id = self.tokenizer.cls_token_id
        self.sep_token_id = self.tokenizer.sep_token_id

    def encode(self, text: str) -> list[int]:
        """Token ids for `text`, without [CLS] and [SEP]."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]



# SigLIP's tokenizer files, as the hub repos of its weights hold them: transformers' fast tokenizer, or a
# sentencepiece model (which needs the `sentencepiece` package).
SIGLIP_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")
# What transformers reads beside them (the tokenizer's class and special tokens), where a repo has them.
TOKENIZER_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_PUNCTUATION = str.maketrans("", "", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def canonicalize(text: str) -> str:
    """big_vision's caption cleaning, which SigLIP was trained on (open_clip's `canonicalize_text`): underscores to
    spaces, ASCII punctuation removed, lowercased, whitespace collapsed."""
    return " ".join(text.replace("_", " ").translate(_PUNCTUATION).lower().split())


class SiglipTokenizer(_PaddedTransformersTokenizer):
    """SigLIP's tokenizer from a folder of tokenizer files (no hub): canonicalized captions, cut to
    `context_length` and padded to it with the tokenizer's pad id, since SigLIP's bidirectional tower pools the
    last position of captions padded as in training."""

    def __init__(self, folder: str | Path | None, context_length: int = 64) -> None:
        self.context_length = _check_context_length(context_length)
        folder = Path(folder) if folder else None
        found = [n for n in SIGLIP_TOKENIZER_FILES if folder is not None and (folder / n).is_file()]
        if not found:
            where = f"{folder} has" if folder is not None else "there are no weights, so there is"
            raise UserError(f"a SigLIP text tower reads its tokenizer from the files beside its weights, and {where} "
                            f"none of {', '.join(SIGLIP_TOKENIZER_FILES)}: put its hub repo's tokenizer files there")
        if "tokenizer.json" not in found:
            try:
                import sentencepiece  # noqa: F401  (transformers reads .model files with it)
            except ImportError as e:
                raise UserError(f"{folder / found[0]} is a sentencepiece model: pip install sentencepiece") from e
        from transformers import AutoTokenizer  # only SigLIP runs pay for importing transformers

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"{folder}: its tokenizer files are not readable ({str(e).splitlines()[0][:200]})") from e
        if self.tokenizer.pad_token_id is None:
            raise UserError(f"{folder}: its tokenizer has no pad token, which SigLIP's captions are padded with")
        self.vocab_size = len(self.tokenizer)
        self.pad_token_id = self.tokenizer.pad_token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of the canonicalized `text`, with the tokenizer's own special tokens, unpadded."""
        return self.tokenizer(self.clean(text))["input_ids"]

    def clean(self, text: str) -> str:
        return canonicalize(text)


# The files a Hugging Face tokenizer reads (any one of them): its fast tokenizer, or a WordPiece vocabulary.
HUB_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
# XLM-R's and XLM-V's sentencepiece model, which transformers converts where a folder has no tokenizer.json
# (AltCLIP's and MetaCLIP 2's transformers folders; it needs the `sentencepiece` package).
XLM_SENTENCEPIECE = "sentencepiece.bpe.model"


def _hub_tokenizer_folder(name: str, folder: Path | None) -> Path:
    """Where `name`'s tokenizer files are: beside the weights, else huggingface_hub's cache (no network here)."""
    if folder is not None and any((folder / n).is_file() for n in (*HUB_TOKENIZER_FILES, XLM_SENTENCEPIECE)):
        return folder
    from huggingface_hub import try_to_load_from_cache

    for n in HUB_TOKENIZER_FILES:
        cached = try_to_load_from_cache(name, n)
        if isinstance(cached, str):
            return Path(cached).parent
    where = f"{folder}" if folder is not None else "the weights' folder (there are none)"
    raise UserError(f"this text tower was trained with {name}'s tokenizer, and neither {where} nor the huggingface_hub "
                    f"cache has its files ({' or '.join(HUB_TOKENIZER_FILES)}): copy them beside the weights, or "
                    f"fetch them once online: huggingface-cli download {name} {' '.join(HUB_TOKENIZER_FILES)} "
                    "tokenizer_config.json")


class HubTokenizer(_PaddedTransformersTokenizer):
    """A Hugging Face tokenizer named by the weights' config (open_clip's `hf_tokenizer_name`: CLIPA's
    bert-base-uncased), as open_clip's HFTokenizer runs it: captions cleaned of mojibake and extra whitespace (not
    lowercased: the tokenizer does what it was built to), cut and padded to the context, and with
    `strip_sep_token` the [SEP] id replaced by 0, since CLIPA was trained without it."""

    def __init__(self, name: str, folder: str | Path | None, context_length: int, strip_sep_token: bool = False,
                 language: str | None = None):
        self.context_length = _check_context_length(context_length)
        source = _hub_tokenizer_folder(name, Path(folder) if folder else None)
        from transformers import AutoTokenizer  # only these runs pay for importing transformers

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"{source}: {name}'s tokenizer files are not readable ({str(e).splitlines()[0][:200]})") from e
        self.name, self.folder, self.strip_sep_token = name, source, strip_sep_token
        self.vocab_size = len(self.tokenizer)
        self.pad_token_id = self.tokenizer.pad_token_id
        self.language = None
        if language:
            self.set_language(language)

    def set_language(self, language: str) -> None:
        """NLLB's source-language code (FLORES-200: "eng_Latn", the default, "fra_Latn", "zho_Hans", ...), the first
        token of every caption: what open_clip's `HFTokenizer.set_language` means to set. Set through the tokenizer's
        `src_lang`, which every later call reads: under transformers 5, open_clip's call (the tokenizer's
        `set_src_lang_special_tokens`) is undone at the next call, which puts `src_lang`'s code back."""
        if not hasattr(self.tokenizer, "src_lang"):
            raise UserError(f"text_language {language!r}: {self.name}'s tokenizer has no source language (NLLB's has); "
                            "leave text_language empty for this model")
        if language not in self.tokenizer.get_vocab():
            raise UserError(f"text_language {language!r} is not one of {self.name}'s language codes: FLORES-200 codes "
                            "such as eng_Latn, fra_Latn, deu_Latn, spa_Latn, zho_Hans, jpn_Jpan, arb_Arab")
        self.tokenizer.src_lang = self.language = language

    def clean(self, text: str) -> str:
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
        return _WHITESPACE.sub(" ", text.strip()).strip()

    def ids(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        ids = super().ids(texts, context_length)
        if self.strip_sep_token:
            ids[ids == self.tokenizer.sep_token_id] = 0
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of the cleaned `text`, with the tokenizer's own special tokens, unpadded."""
        return self.tokenizer(self.clean(text))["input_ids"]


def reads_files_beside(text: "TextConfig") -> bool:
    """Whether a text tower's tokenizer is read from files that travel with its weights (SigLIP's, a Hugging Face
    tokenizer's), which every folder of weights written from it must hold too."""
    return bool(text.tokenizer) or tokenizer_kind(text.kind) == "siglip"


def copy_tokenizer_files(source: Path | None, target: Path) -> None:
    """The tokenizer files in `source` (the weights' folder) written beside weights saved in `target`."""
    from utils.files import atomic_write_bytes

    if source is None or not source.is_dir() or source.resolve() == target.resolve():
        return
    for name in dict.fromkeys((*SIGLIP_TOKENIZER_FILES, *HUB_TOKENIZER_FILES, XLM_SENTENCEPIECE,
                               *TOKENIZER_CONFIG_FILES)):
        if (source / name).is_file():
            atomic_write_bytes((source / name).read_bytes(), target / name)


def text_tokenizer(text: "TextConfig", weights: str | Path | None, bert_vocab_path: str | Path | None = None,
                   language: str | None = None):
    """The tokenizer a text tower's weights were trained with: the Hugging Face one its config names, else its
    kind's (OpenAI's BPE, BERT's vocab at `bert_vocab_path`, SigLIP's files beside `weights`). `language`: NLLB's
    source-language code for the captions (`HubTokenizer.set_language`); None keeps the tokenizer's own."""
    from nets.open_clip_configs import HF_TOKENIZERS

    if text.tokenizer:
        return HubTokenizer(text.tokenizer, files_beside(weights), text.context_length,
                            **HF_TOKENIZERS[text.tokenizer], language=language)
    kind = tokenizer_kind(text.kind)
    if language:
        raise UserError(f"text_language {language!r}: only NLLB text towers take a source language; this model's "
                        f"tokenizer is {kind}'s, so leave text_language empty")
    return build_tokenizer(kind, text.context_length, {"bert": bert_vocab_path, "siglip": files_beside(weights)}.get(kind))


def files_beside(weights: str | Path | None) -> Path | None:
    """The folder whose files go with `weights` (SigLIP's tokenizer files): a weight folder itself, else a weight
    file's folder; None without weights."""
    if not weights:
        return None
    weights = Path(weights)
    return weights if weights.is_dir() else weights.parent


def tokenizer_kind(text_kind: str) -> str:
    """The tokenizer a text tower kind was trained with: its key in TOKENIZERS."""
    return "bert" if text_kind.startswith("bert") else "siglip" if text_kind == "siglip" else "openai"


def truncated(tokenizer: "BPETokenizer | BertTokenizer | SiglipTokenizer", text: str) -> bool:
    """Whether `text` with its start and end tokens is longer than the tokenizer's context, so that the ids the
    text tower sees stop short of its end. One test for train.py's report, the search prompt and the web page."""
    if isinstance(tokenizer, SiglipTokenizer):  # its own special tokens are in encode()'s ids
        return len(tokenizer.encode(text)) > tokenizer.context_length
    room = tokenizer.context_length - 2
    # A token covers at least one byte of the cleaned text (BPE) or one character (WordPiece): shorter texts
    # need no tokenizing.
    shown = len(text) if isinstance(tokenizer, BertTokenizer) else len(clean_text(text).encode("utf-8"))
    return shown > room and len(tokenizer.encode(text)) > room


TOKENIZERS = {"openai": BPETokenizer, "bert": BertTokenizer, "siglip": SiglipTokenizer}


def build_tokenizer(
    kind: str, context_length: int, vocab_path: str | Path | None = None
) -> BPETokenizer | BertTokenizer | SiglipTokenizer:
    """The tokenizer for a text tower: "openai" (byte-level BPE), "bert" (WordPiece) or "siglip" (sentencepiece).
    `vocab_path` defaults to the matching file in model_data/; SigLIP's is the folder of its tokenizer files."""
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(TOKENIZERS)}")
    return TOKENIZERS[kind](vocab_path, context_length)


def trim_padding(tokens: np.ndarray, pad_id: int = 0) -> np.ndarray:
    """`tokens` without the columns that are padding (`pad_id`) in every row: less work for the same features, where
    the tower masks its padding or never reads past the pooled token (the ONNX graphs of onnx_predict and nets/ort)."""
    used = np.flatnonzero((tokens != pad_id).any(axis=0))
    return tokens[:, :max(2, int(used[-1]) + 1 if used.size else 2)]
