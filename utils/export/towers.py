"""The modules exported to image.onnx and text.onnx, one per tower, each stating the inputs its file takes.

Every wrapper runs its tower's fixed-shape path: a traced export turns a shape computed from the data (the
text towers' trimming and packing) into a constant, so the graph would fail on any other batch. Which axes
may vary is in `dynamic_shapes`; `example` is the input the export traces with.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim


class _BatchEncoder(nn.Module):
    """A tower whose input has one free dimension, the batch (images at the export's size, SigLIP's padded captions)."""

    input_name: str

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

    def __init__(self, text: nn.Module):
        super().__init__()
        self.text = text
        self.context_length = text.context_length

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text.forward_padded(tokens)

    def dynamic_shapes(self) -> dict:
        return {self.input_name: {0: Dim("batch"), 1: Dim("length", min=2, max=self.context_length)}}


class OpenAITextEncoder(_TextEncoder):
    """text.onnx of an OpenAI (byte-level BPE) text tower: `tokens` -> `features`.

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


class SiglipTextEncoder(_BatchEncoder):
    """text.onnx of a SigLIP (sentencepiece) text tower: `tokens` -> `features`.

    tokens: int64, (N, context_length) with any N >= 1: rows as `CLIP.tokenize` makes them with the tokenizer files
        of the export folder (tokenizer.json / spiece.model): the ids of the canonicalized caption (lower case, no
        punctuation) and `</s>`, cut to the context and padded to its full length with the pad id. The tower
        attends both ways without a mask and reads the last position, so no column may be dropped.
    features: float32 (float16 in an fp16 export), (N, embed_dim): `CLIP.encode_text`'s projection, not
        L2-normalised.
    """

    input_name = "tokens"

    def __init__(self, text: nn.Module):
        super().__init__()
        self.text = text
        self.context_length = text.context_length

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text(tokens)  # fixed shape already: nothing is trimmed

    def example(self, dtype: torch.dtype) -> torch.Tensor:
        vocab = self.text.token_embedding.num_embeddings
        return torch.arange(3 * self.context_length).reshape(3, self.context_length) % vocab


class BidirectionalOpenAITextEncoder(_BatchEncoder):
    """text.onnx of an OpenAI (byte-level BPE) text tower read at the full context: MobileCLIP's, without the causal
    mask, or CoCa's, whose class embedding sits after the padding: `tokens` -> `features`.

    tokens: int64, (N, context_length) with any N >= 1: rows as `CLIP.tokenize` makes them (OpenAITextEncoder's),
        padded with 0s to the full context. MobileCLIP's positions attend to every other, padding included, as the
        weights were trained, and CoCa's class position is the context's end, so no column may be dropped.
    features: float32 (float16 in an fp16 export), (N, embed_dim): `CLIP.encode_text`'s projection, not
        L2-normalised.
    """

    input_name = "tokens"

    def __init__(self, text: nn.Module):
        super().__init__()
        self.text = text
        self.context_length = text.context_length

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text.forward_padded(tokens)

    def example(self, dtype: torch.dtype) -> torch.Tensor:
        vocab = self.text.token_embedding.num_embeddings
        tokens = torch.zeros(3, self.context_length, dtype=torch.long)
        tokens[:, 0], tokens[:, 1:3], tokens[:, 3] = vocab - 2, 1000 % (vocab - 2), vocab - 1
        return tokens


def encoders(net: nn.Module) -> dict[str, nn.Module]:
    """{"image": ..., "text": ...}: the wrapper of each tower of a `nets.CLIP`, in eval mode."""
    kind = net.config.text.kind
    text = SiglipTextEncoder(net.text) if kind == "siglip" else \
        BertTextEncoder(net.text) if net.config.text.is_bert else \
        OpenAITextEncoder(net.text) if net.config.text.causal and kind != "coca" else \
        BidirectionalOpenAITextEncoder(net.text)
    return {"image": ImageEncoder(net.visual).eval(), "text": text.eval()}
