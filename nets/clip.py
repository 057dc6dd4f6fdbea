"""CLIP: an image tower, a text tower and the temperature that compares them."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .coca import PAD_ID, CaptionSteps, CoCaTextTower, CoCaVisionTransformer, MultimodalDecoder
from .configs import CLIPConfig, TextConfig, VisionConfig
from .modified_resnet import ModifiedResNet
from .text_openai import OpenAITextTower
from .text_siglip import SiglipTextTower
from .vit import VisionTransformer

TEXT_PREFIX = "text."


def _bert_tower(config: TextConfig, embed_dim: int) -> nn.Module:
    from .text_bert import BertTextTower  # importing transformers' BERT costs seconds; only when used

    return BertTextTower(config, embed_dim)


def _hf_tower(config: TextConfig, embed_dim: int) -> nn.Module:
    from .text_hf import HFTextTower  # transformers' models cost seconds to import; only when used

    return HFTextTower(config, embed_dim)


def _altclip_tower(config: TextConfig, embed_dim: int) -> nn.Module:
    from .text_altclip import AltCLIPTextTower  # transformers' XLM-R, imported only when used

    return AltCLIPTextTower(config, embed_dim)


def _timm_tower(config: VisionConfig, embed_dim: int) -> nn.Module:
    from .vision_timm import timm_tower  # timm costs a second to import; only its towers need it

    return timm_tower(config, embed_dim)


# A tower kind is a row: kind -> builder(tower config, embed_dim) -> module. Image towers keep OpenAI's keys under
# `visual.`; text towers at the top level of the file, as OpenAI's do (the `text.` prefix never reaches a file),
# except those of TEXT_KEEPS_PREFIX, whose files (open_clip's `custom_text` models) keep it.
IMAGE_TOWERS: dict[str, Callable[[VisionConfig, int], nn.Module]] = {"vit": VisionTransformer,
                                                                     "resnet": ModifiedResNet, "timm": _timm_tower,
                                                                     "coca-vit": CoCaVisionTransformer}
TEXT_TOWERS: dict[str, Callable[[TextConfig, int], nn.Module]] = {"openai": OpenAITextTower,
                                                                  "bert-pooler": _bert_tower, "bert-cls": _bert_tower,
                                                                  "siglip": SiglipTextTower,
                                                                  "openai-custom": OpenAITextTower,
                                                                  "hf": _hf_tower,
                                                                  "coca": CoCaTextTower,
                                                                  "altclip": _altclip_tower}
TEXT_KEEPS_PREFIX = {"siglip", "openai-custom", "hf", "coca"}


def build_tower(towers: dict[str, Callable], config: VisionConfig | TextConfig, embed_dim: int) -> nn.Module:
    if config.kind not in towers:
        raise ValueError(f"no builder for tower kind {config.kind!r}; known: {', '.join(towers)}")
    return towers[config.kind](config, embed_dim)


def _drop_text_prefix(module, state_dict, prefix, local_metadata) -> None:
    # OpenAI's checkpoints keep the text tower at the top level (`token_embedding`, `transformer`,
    # `ln_final`, ...); `text.` is only how this code groups it, so it never reaches a file.
    if module.config.text.kind in TEXT_KEEPS_PREFIX:
        return
    inner = prefix + TEXT_PREFIX
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        state_dict[prefix + key[len(inner):] if key.startswith(inner) else key] = value


def _add_text_prefix(module, state_dict, prefix, *args) -> None:
    if module.config.text.kind in TEXT_KEEPS_PREFIX:
        return
    own = {prefix + "visual.", prefix + "logit_scale", prefix + "logit_bias"}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if not any(key.startswith(o) for o in own):
            state_dict[prefix + TEXT_PREFIX + key[len(prefix):]] = state_dict.pop(key)


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.visual = build_tower(IMAGE_TOWERS, config.vision, config.embed_dim)
        self.text = build_tower(TEXT_TOWERS, config.text, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # SigLIP's: logits are scale * cos + bias. None (no key in the state dict) for every other model.
        bias = config.init_logit_bias
        self.register_parameter("logit_bias", None if bias is None else nn.Parameter(torch.tensor(float(bias))))
        # CoCa's caption decoder (`text_decoder.*`, open_clip's keys); None for every other model.
        self.text_decoder = None if config.decoder is None else MultimodalDecoder(config.decoder)
        # Another runtime for the towers' inference (nets/ort.py's onnxruntime): its image(net, pixels) / text(net,
        # tokens) answer a call or return None for the towers to run it. None: the towers always do.
        self.runtime = None
        self.register_state_dict_post_hook(_drop_text_prefix)
        self.register_load_state_dict_pre_hook(_add_text_prefix)

    @property
    def dtype(self) -> torch.dtype:
        # The patch embedding's: OpenAI's fp16 conversion leaves class and positional embeddings in fp32.
        return next(m.weight.dtype for m in self.visual.modules() if isinstance(m, nn.Conv2d))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    @property
    def writes_captions(self) -> bool:
        return self.text_decoder is not None

    def caption_logits(self, image_tokens: torch.Tensor, tokens: torch.Tensor, last: bool = False) -> torch.Tensor:
        """CoCa: (N, L, vocab) next-token logits of captions `tokens` (N, L) given `visual.forward_with_tokens`'s
        image tokens: open_clip's `model(image, tokens, output_labels=False)["logits"]`; `last`: the last
        position's alone, (N, vocab)."""
        return self.text_decoder(image_tokens, self.text.forward_with_tokens(tokens)[1], last)

    def caption_steps(self, image_tokens: torch.Tensor, beams: int = 1):
        """CoCa: `caption_logits` one token at a time with a key-value cache (nets/coca.py CaptionSteps) for `beams`
        rows per image; None where the decoder's blocks are not the plain ones it follows (an adapter around them)."""
        return CaptionSteps(self, image_tokens, beams) if CaptionSteps.fits(self) else None

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        features = None if self.runtime is None else self.runtime.image(self, pixels)
        return self.visual(pixels) if features is None else features

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        features = None if self.runtime is None else self.runtime.text(self, tokens)
        return self.text(tokens) if features is None else features

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor, captions: bool = False) -> tuple[torch.Tensor, ...]:
        """Normalised image and text features, the temperature `logit_scale.exp()` and, for a model with one,
        `logit_bias` (open_clip's outputs, so `criterion(*model(pixels, tokens))` fits both).

        Logits are `scale * image_features @ text_features.T (+ bias)`; the losses live in `utils/train/loss.py`
        so that they can gather features across processes. `captions` (CoCa): one more output, the decoder's
        (N, L - 1, vocab) logits of each caption's next tokens `tokens[:, 1:]` (utils/train/caption_loss.py).
        """
        if captions:
            return self._forward_with_captions(pixels, tokens)
        image_features = F.normalize(self.encode_image(pixels), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        if self.logit_bias is None:
            return image_features, text_features, self.logit_scale.exp()
        return image_features, text_features, self.logit_scale.exp(), self.logit_bias

    def _forward_with_captions(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """open_clip's `CoCa.forward(image, text)`: each tower runs once for both the features and the decoder."""
        if not self.writes_captions:
            raise ValueError("captions=True needs a model with a caption decoder (a CoCa)")
        if tokens.shape[1] > self.text.context_length:
            raise ValueError(f"{tokens.shape[1]} tokens per caption; this tower takes at most {self.text.context_length}")
        image_features, image_tokens = self.visual.forward_with_tokens(pixels)
        # The class embedding sits after the full context's padding, as the text tower's forward puts it. The decoder
        # is causal, so logits of the caption's own positions do not depend on how much padding follows.
        padded = F.pad(tokens, (0, self.text.context_length - tokens.shape[1]), value=PAD_ID)
        text_features, states = self.text.forward_with_tokens(padded)
        logits = self.text_decoder(image_tokens, states[:, :tokens.shape[1] - 1])  # N, L - 1, vocab
        scalars = (self.logit_scale.exp(),) if self.logit_bias is None else (self.logit_scale.exp(), self.logit_bias)
        return F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1), *scalars, logits

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """(images, texts) scores of normalised features: `scale * cos`, plus the bias of a model with one."""
        logits = self.logit_scale.exp().float() * image_features.float() @ text_features.float().t()
        return logits if self.logit_bias is None else logits + self.logit_bias.float()


def build_model(config: CLIPConfig) -> CLIP:
    return CLIP(config)
