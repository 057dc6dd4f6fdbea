"""Model-table rows of open_clip's HFTextEncoder models (RoBERTa, XLM-R and NLLB-200 text towers through transformers)
as plain dicts, `CLIPConfig.to_dict`'s form, with open_clip 3.3's model_configs JSON sizes.

open_clip builds these text towers from the hub's config.json of `hf_model_name` (AutoConfig.from_pretrained); there
is no hub here, so `HF_TEXT_MODELS` holds what those configs say that shapes the network, and a row records it all,
so a saved record rebuilds the tower offline. Plain data, importing nothing (nets/configs.py checks every row).
"""
from __future__ import annotations

# transformers model name -> its config.json's sizes as TextConfig fields: `hf_family` is the transformers model_type
# (RobertaModel, XLMRobertaModel, the encoder of M2M100Model), `pad_id` its pad_token_id (the attention mask is
# `ids != pad_id`, as open_clip's HFTextEncoder makes it), `activation` its hidden_act / activation_function.
HF_TEXT_MODELS: dict[str, dict] = {
    "roberta-base": dict(hf_family="roberta", vocab_size=50265, width=768, layers=12, heads=12,
                         intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_id=1,
                         activation="gelu", eps=1e-5),
    "xlm-roberta-base": dict(hf_family="xlm-roberta", vocab_size=250002, width=768, layers=12, heads=12,
                             intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_id=1,
                             activation="gelu", eps=1e-5),
    "xlm-roberta-large": dict(hf_family="xlm-roberta", vocab_size=250002, width=1024, layers=24, heads=16,
                              intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1, pad_id=1,
                              activation="gelu", eps=1e-5),
    # NLLB-200's encoders (M2M100, sinusoidal positions, embeddings scaled by sqrt(width), ReLU); open_clip keeps only
    # the encoder of the encoder-decoder model.
    "facebook/nllb-200-distilled-600M": dict(hf_family="m2m_100", vocab_size=256206, width=1024, layers=12, heads=16,
                                             intermediate_size=4096, max_position_embeddings=1024, pad_id=1,
                                             activation="relu"),
    "facebook/nllb-200-distilled-1.3B": dict(hf_family="m2m_100", vocab_size=256206, width=1024, layers=24, heads=16,
                                             intermediate_size=8192, max_position_embeddings=1024, pad_id=1,
                                             activation="relu"),
}
# open_clip's poolers (hf_pooler_type) built here: the mean of the unmasked positions, the first position's state
# (or the model's own pooler output where it has one: cls_pooler), the first position's state always.
HF_POOLERS = ("mean_pooler", "cls_pooler", "cls_last_hidden_state_pooler")
# open_clip's projections (hf_proj_type): a Linear, an MLP (Linear, GELU, Linear; no biases), "" none (width is the
# embedding and open_clip's JSON says null).
HF_PROJS = ("linear", "mlp", "")


def hf_text(name: str, pooler: str, proj: str, context_length: int = 77) -> dict:
    """open_clip's text_cfg with `hf_model_name` = `hf_tokenizer_name` = `name`: the context is open_clip's default
    77, which its HFTokenizer cuts and pads captions to (the tower's positions go further)."""
    return dict(kind="hf", context_length=context_length, tokenizer=name, hf_pooler=pooler, hf_proj=proj,
                **HF_TEXT_MODELS[name])


def _openai_vit(image_size: int, patch_size: int, width: int, layers: int, head_width: int = 64,
                activation: str = "gelu") -> dict:
    return dict(image_size=image_size, patch_size=patch_size, width=width, layers=layers, heads=width // head_width,
                activation=activation)


def _siglip_vit(trunk: str, patch_size: int, width: int, layers: int, heads: int, mlp_ratio: float) -> dict:
    """SigLIP's timm tower at 384 px, as nets/configs.py's SigLIP rows build it (attention pool, no projection)."""
    return dict(kind="timm", timm_model_name=trunk, image_size=384, patch_size=patch_size, width=width, layers=layers,
                heads=heads, mlp_ratio=mlp_ratio, activation="gelu")


_NLLB_600M, _NLLB_13B = "facebook/nllb-200-distilled-600M", "facebook/nllb-200-distilled-1.3B"
# open_clip 3.3's configs (model_configs/*roberta*.json, nllb-clip-*.json). hf_proj_type is open_clip's default "mlp"
# where the JSON leaves it out (the RoBERTa ones); roberta-ViT-B-32's quick_gelu is its ViT's (the text tower's
# activation is RoBERTa's own GELU).
HF_ROWS: dict[str, dict] = {
    "roberta-ViT-B-32": dict(embed_dim=512, vision=_openai_vit(224, 32, 768, 12, activation="quick_gelu"),
                             text=hf_text("roberta-base", "mean_pooler", "mlp")),
    "xlm-roberta-base-ViT-B-32": dict(embed_dim=512, vision=_openai_vit(224, 32, 768, 12),
                                      text=hf_text("xlm-roberta-base", "mean_pooler", "mlp")),
    "xlm-roberta-large-ViT-H-14": dict(embed_dim=1024, vision=_openai_vit(224, 14, 1280, 32, head_width=80),
                                       text=hf_text("xlm-roberta-large", "mean_pooler", "mlp")),
    "nllb-clip-base": dict(embed_dim=512, vision=_openai_vit(224, 32, 768, 12),
                           text=hf_text(_NLLB_600M, "cls_pooler", "linear")),
    "nllb-clip-large": dict(embed_dim=1024, vision=_openai_vit(224, 14, 1280, 32, head_width=80),
                            text=hf_text(_NLLB_13B, "cls_pooler", "linear")),
    "nllb-clip-base-siglip": dict(embed_dim=768, init_logit_bias=-10.0,
                                  vision=_siglip_vit("vit_base_patch16_siglip_384", 16, 768, 12, 12, 4.0),
                                  text=hf_text(_NLLB_600M, "cls_pooler", "linear")),
    # mlp_ratio: the one whose int(width * ratio) is timm's 4304 hidden units (nets/configs.py's mlp_ratio_of).
    "nllb-clip-large-siglip": dict(embed_dim=1152, init_logit_bias=-10.0,
                                   vision=_siglip_vit("vit_so400m_patch14_siglip_384", 14, 1152, 27, 16,
                                                      3.736111111111111),
                                   text=hf_text(_NLLB_13B, "cls_pooler", "linear")),
}
