"""The modules exported to image.onnx and text.onnx, one per tower, each stating the inputs its file takes, and the
export of one (export_onnx's files, nets/ort.py's cached runtime).

Every wrapper runs its tower's fixed-shape path: a traced export turns a shape computed from the data (the
text towers' trimming and packing) into a constant, so the graph would fail on any other batch. Which axes
may vary is in `dynamic_shapes`; `example` is the input the export traces with.
"""
from __future__ import annotations

import re

import torch
from torch import nn
from torch.export import Dim

from utils.errors import UserError

# torch's exporter builds its graphs in opset 18 (TORCHLIB_OPSET); the issue asks for 17 or later.
OPSET = 18


class _BatchEncoder(nn.Module):
    """A tower whose input has one free dimension, the batch (images at the export's size, SigLIP's padded captions)."""

    input_name: str
    # Whether columns of padding alone may be dropped before the graph (onnx_predict's trim_padding): only where the
    # tower's features do not depend on the padding.
    trims_padding = False

    def dynamic_shapes(self) -> dict:
        return {self.input_name: {0: Dim("batch")}}


class ImageEncoder(_BatchEncoder):
    """image.onnx: `pixels` -> `features`.

    pixels: float32 (float16 in an fp16 export), shape (N, 3, S, S) with S = config.json "image_size" and any
        N >= 1. RGB, each channel (value / 255 - mean) / std with config.json "mean" and "std", after a bicubic
        resize of the shorter side to S and a centre crop of S x S (with "letterbox": the whole image resized
        to fit S x S, centred on grey (128, 128, 128)).
    features: the same float type, (N, embed_dim): `CLIP.encode_image`'s projection, not L2-normalised.
    """

    input_name = "pixels"

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.image_size = visual.image_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)

    def example(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(2, 3, self.image_size, self.image_size, dtype=dtype)


class _TextEncoder(nn.Module):
    """A text tower's fixed-shape path (`forward_padded`), with a batch and a length that may vary."""

    input_name = "tokens"
    trims_padding = True

    def __init__(self, text: nn.Module):
        super().__init__()
        self.text = text
        self.context_length = text.context_length

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text.forward_padded(tokens)

    def dynamic_shapes(self) -> dict:
        return {self.input_name: {0: Dim("batch"), 1: Dim("length", min=2, max=self.context_length)}}


class OpenAITextEncoder(_TextEncoder):
    """text.onnx of an OpenAI (byte-level BPE) causal text tower: `tokens` -> `features`. (MetaCLIP 2's "worldwide"
    tower is one over XLM-V's ids, read with the export folder's tokenizer files: <s> (0), ids, </s> (2), then <pad>
    (1); it pools the first </s>, and columns of <pad> alone may be dropped.)

    tokens: int64, (N, L) with any N >= 1 and 2 <= L <= context_length (77): rows as `CLIP.tokenize` makes
        them. Each row is SOT (49406), the BPE ids of the cleaned, lower-cased caption, EOT (49407), then 0s to
        the end; a caption too long for the context is cut and its last kept id replaced by EOT. EOT must be the
        largest id of its row: the tower reads the state at each row's argmax. Columns after the longest row's
        EOT may be dropped (any L that keeps every EOT gives the same features, and a shorter L is faster).
    features: float32 (float16 in an fp16 export), (N, embed_dim): `CLIP.encode_text`'s projection, not
        L2-normalised.
    """

    def example(self, dtype: torch.dtype) -> torch.Tensor:
        # Lengths below the maximum on both axes, so that neither is traced as a constant.
        vocab = self.text.token_embedding.num_embeddings
        tokens = torch.zeros(3, min(8, self.context_length - 1), dtype=torch.long)
        tokens[:, 0], tokens[:, 1:3], tokens[:, 3] = vocab - 2, 1000 % (vocab - 2), vocab - 1
        return tokens


class BertTextEncoder(_TextEncoder):
    """text.onnx of a BERT (WordPiece) text tower, self-cn's or Chinese-CLIP's: `tokens` -> `features`.

    tokens: int64, (N, L) with any N >= 1 and 2 <= L <= context_length (config.json): rows as `CLIP.tokenize`
        makes them with the bert-base-chinese vocabulary (vocab file in the export folder). Each row is [CLS]
        (101), the WordPiece ids of the caption, [SEP] (102), then [PAD] (0) to the end; too long a caption is
        cut so that [SEP] stays last. The graph masks out every 0 and uses token type 0 throughout, so no mask
        or type input is needed. Columns that are 0 in every row may be dropped (same features, faster).
    features: float32 (float16 in an fp16 export), (N, embed_dim): `CLIP.encode_text`'s projection, not
        L2-normalised.
    """

    def example(self, dtype: torch.dtype) -> torch.Tensor:
        tokens = torch.zeros(3, min(8, self.context_length - 1), dtype=torch.long)
        tokens[:, 0], tokens[:, 1:3], tokens[:, 3] = 101, 2000, 102
        tokens[0, 3:5] = torch.tensor([2001, 102])  # one row longer, so the mask is not all alike
        return tokens


class FullContextTextEncoder(_BatchEncoder):
    """text.onnx of a text tower that reads every position of the full context, padding included: `tokens` ->
    `features`. SigLIP's (sentencepiece; it attends both ways without a mask and reads the last position),
    MobileCLIP's OpenAI tower without the causal mask (it attends to the padding, as the weights were trained), CoCa's
    (its class embedding sits after the padding) and CLIPA's (bert-base-uncased ids, [SEP] stripped, no mask, the last
    position pooled).

    tokens: int64, (N, context_length) with any N >= 1: rows as `CLIP.tokenize` makes them with the export folder's
        tokenizer (SigLIP's and CLIPA's files, or OpenAI's vocabulary), padded to the full context with the pad id
        (config.json "pad_id"). No column may be dropped.
    features: float32 (float16 in an fp16 export), (N, embed_dim): `CLIP.encode_text`'s projection, not
        L2-normalised.
    """

    input_name = "tokens"

    def __init__(self, text: nn.Module, vocab_size: int):
        super().__init__()
        self.text = text
        self.context_length = text.context_length
        self.vocab_size = vocab_size
        # SigLIP's tower has a fixed shape already (nothing is trimmed); the OpenAI towers' fixed-shape path is
        # forward_padded.
        self.padded_path = hasattr(text, "forward_padded")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text.forward_padded(tokens) if self.padded_path else self.text(tokens)

    def example(self, dtype: torch.dtype) -> torch.Tensor:
        vocab = self.vocab_size
        tokens = torch.zeros(3, self.context_length, dtype=torch.long)
        tokens[:, 0], tokens[:, 1:3], tokens[:, 3] = vocab - 2, 1000 % (vocab - 2), vocab - 1
        return tokens


class HFTextEncoder(_TextEncoder):
    """text.onnx of a transformers text tower (open_clip's HFTextEncoder: RoBERTa, XLM-R, NLLB's encoder; AltCLIP's
    XLM-R): `tokens` -> `features`.

    tokens: int64, (N, L) with any N >= 1 and 2 <= L <= context_length: rows as `CLIP.tokenize` makes them with the
        tokenizer files of the export folder: the tokenizer's own special tokens around the caption (<s> ... </s>, or
        NLLB's language code first), cut to the context, then the pad id (config.json "pad_id") to the end. The graph
        masks out every pad id (attention, positions, pooling), so no mask input is needed, and columns that are
        padding in every row may be dropped (same features, faster).
    features: float32 (float16 in an fp16 export), (N, embed_dim): `CLIP.encode_text`'s projection, not
        L2-normalised.
    """

    def __init__(self, text: nn.Module, vocab_size: int, pad_id: int):
        super().__init__(text)
        self.vocab_size, self.pad_id = vocab_size, pad_id

    def example(self, dtype: torch.dtype) -> torch.Tensor:
        tokens = torch.full((3, min(8, self.context_length - 1)), self.pad_id, dtype=torch.long)
        tokens[:, 0], tokens[:, 1:3], tokens[:, 3] = 0, (self.pad_id + 5) % self.vocab_size, 2
        tokens[0, 3:5] = torch.tensor([7 % self.vocab_size, 2])  # one row longer, so the mask is not all alike
        return tokens


def encoders(net: nn.Module) -> dict[str, nn.Module]:
    """{"image": ..., "text": ...}: the wrapper of each tower of a `nets.CLIP`, in eval mode."""
    config = net.config.text
    if config.kind in ("hf", "altclip"):
        # The pad id the tower masks: the hf row's, AltCLIP's XLM-R <pad>.
        pad_id = config.pad_id if config.kind == "hf" else net.text.pad_token_id
        text = HFTextEncoder(net.text, config.vocab_size, pad_id)
    elif config.is_bert:
        text = BertTextEncoder(net.text)
    elif config.causal and config.kind not in ("siglip", "coca") and config.pool != "last":
        text = OpenAITextEncoder(net.text)
    else:  # SigLIP's, CoCa's, MobileCLIP's and CLIPA's: the full context, padding included
        text = FullContextTextEncoder(net.text, config.vocab_size)
    return {"image": ImageEncoder(net.visual).eval(), "text": text.eval()}


def export_tower(encoder: torch.nn.Module, dtype: torch.dtype) -> bytes:
    """The serialised ONNX model of one wrapper above, its batch (and text length) dynamic."""
    name = encoder.input_name
    with torch.no_grad():
        program = torch.onnx.export(encoder, (encoder.example(dtype),), input_names=[name],
                                    output_names=["features"], dynamic_shapes=encoder.dynamic_shapes(),
                                    opset_version=OPSET, dynamo=True, external_data=False, verbose=False)
    return program.model_proto.SerializeToString()


def refusal(error: Exception) -> str:
    """What stopped torch's exporter, in a few words: the op it has no ONNX function for (`aten._linalg_eigh.default`),
    else the node it could not translate, else its message's first line."""
    text = str(error)
    op = re.search(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>", text)
    if op:
        return f"the op {op[1]}.{op[2]} has no ONNX function in torch's exporter"
    node = re.search(r"target=(torch\.ops\.[\w.]+)", text)
    if node:
        return f"torch's exporter cannot translate the op {node[1].removeprefix('torch.ops.')}"
    return next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)[:200]


def export_or_refuse(encoder: torch.nn.Module, dtype: torch.dtype, what: str) -> bytes:
    """export_tower's bytes, or a one-line UserError naming `what` (a tower) and the op that does not export."""
    try:
        return export_tower(encoder, dtype)
    except torch.onnx.OnnxExporterError as e:
        raise UserError(f"ONNX export of {what} is refused: {refusal(e)}; use the PyTorch model") from e
