"""SigLIP / SigLIP 2 towers (nets/vision_timm.py, nets/text_siglip.py) against open_clip 3.3: features of small
random-weight models within 1e-4 and open_clip's keys loading strictly (every full-size architecture's names and
shapes on the meta device: tests/test_siglip_table.py, through the model table's rows)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nets import build_model
from nets.configs import TextConfig, mlp_ratio_of
from nets.open_clip_configs import from_open_clip
from nets.text_siglip import SiglipTextTower

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

# A name timm does not know, standing for a 2-block, 64-wide SigLIP ViT on 32 px, so open_clip can build it.
TINY_TRUNK = "vit_tiny_test_siglip_32"
TINY_OVERRIDES = dict(embed_dim=64, depth=2, num_heads=2, img_size=32, patch_size=8)


def _tiny_open_clip_config(siglip2: bool) -> dict:
    text = dict(context_length=16, vocab_size=300, width=64, heads=2, layers=2, no_causal_mask=True, proj_bias=True,
                pool_type="last", norm_kwargs={"eps": 1e-6}, mlp_ratio=3.5)
    if siglip2:
        text["act_kwargs"] = {"approximate": "tanh"}
    return dict(embed_dim=64, init_logit_bias=-10, custom_text=True,
                vision_cfg=dict(image_size=32, timm_model_name=TINY_TRUNK, timm_model_pretrained=False,
                                timm_pool="map", timm_proj="none"),
                text_cfg=text)


def towers_from_open_clip(cfg: dict) -> tuple[torch.nn.Module, SiglipTextTower]:
    """Our towers for an open_clip SigLIP config, as the model table builds them."""
    model = build_model(from_open_clip(cfg))
    return model.visual, model.text


@pytest.fixture
def tiny_open_clip(monkeypatch):
    """open_clip's `create_model` for the tiny configs: registered for the test and removed after it, with timm
    building TINY_TRUNK as the small SigLIP ViT."""
    real_create = timm.create_model

    def create(name, *args, **kwargs):
        if name == TINY_TRUNK:
            return real_create("vit_base_patch16_siglip_224", *args, **{**kwargs, **TINY_OVERRIDES})
        return real_create(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)
    registry = open_clip.factory._MODEL_CONFIGS

    def build(name: str, cfg: dict):
        monkeypatch.setitem(registry, name, cfg)
        return open_clip.create_model(name, pretrained=None).eval()

    return build


def _move_every_parameter(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # LayerNorm gains, biases and the attention-pool latent too
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _tower_state(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.slow
@pytest.mark.parametrize("siglip2", [False, True], ids=["siglip", "siglip2"])
def test_towers_give_open_clips_features_and_scores_within_1e_4(tiny_open_clip, siglip2):
    torch.manual_seed(0)
    cfg = _tiny_open_clip_config(siglip2)
    reference = tiny_open_clip("tiny-siglip2-test" if siglip2 else "tiny-siglip-test", cfg)
    _move_every_parameter(reference, seed=1)
    visual, text = towers_from_open_clip(cfg)
    state = reference.state_dict()
    assert set(state) == {f"visual.{k}" for k in visual.state_dict()} | {f"text.{k}" for k in text.state_dict()} \
        | {"logit_scale", "logit_bias"}
    visual.load_state_dict(_tower_state(state, "visual."), strict=True)
    text.load_state_dict(_tower_state(state, "text."), strict=True)
    visual.eval(), text.eval()
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    tokens = torch.randint(2, 300, (4, 16), generator=g)
    tokens[1, 5:] = 1  # padded captions, as SigLIP's tokenizers pad them
    tokens[2, 9:] = 1
    with torch.no_grad():
        ours = visual(pixels), text(tokens)
        theirs = reference.encode_image(pixels), reference.encode_text(tokens)
        for a, b in zip(ours, theirs):
            assert (a - b).abs().max() <= 1e-4
            assert b.abs().max() > 1e-2  # features of moved weights, not zeros
        images, texts, scale, bias = reference(pixels, tokens)
        expected = torch.sigmoid(scale * images @ texts.t() + bias)
        probs = torch.sigmoid(scale * F.normalize(ours[0], dim=-1) @ F.normalize(ours[1], dim=-1).t() + bias)
        assert (probs - expected).abs().max() <= 1e-4
        # SigLIP 2's tanh GELU is not SigLIP's exact one: the comparison tells them apart.
        other = SiglipTextTower(TextConfig(**{**text_config_of(text), "activation": "gelu" if siglip2 else "gelu_tanh"}),
                                64)
        other.load_state_dict(text.state_dict())
        assert (other.eval()(tokens) - theirs[1]).abs().max() > 1e-4


def text_config_of(tower: SiglipTextTower) -> dict:
    block = tower.transformer.resblocks[0]
    width = tower.token_embedding.embedding_dim
    approximate = block.mlp.gelu.approximate
    return dict(kind="siglip", context_length=tower.context_length, vocab_size=tower.token_embedding.num_embeddings,
                width=width, layers=len(tower.transformer.resblocks), heads=block.attn.heads,
                mlp_ratio=mlp_ratio_of(width, block.mlp.c_fc.out_features),
                activation="gelu_tanh" if approximate == "tanh" else "gelu", eps=block.ln_1.eps,
                proj_bias=tower.text_projection.bias is not None)


def test_text_tower_attends_both_ways_and_pools_the_last_position():
    torch.manual_seed(0)
    tower = SiglipTextTower(TextConfig(kind="siglip", context_length=8, vocab_size=50, width=32, layers=1, heads=2),
                            16).eval()
    tokens = torch.randint(2, 50, (1, 8))
    changed = tokens.clone()
    changed[0, -1] = (tokens[0, -1] + 1) % 50  # only the last token differs...
    earlier = tokens.clone()
    earlier[0, 0] = (tokens[0, 0] + 1) % 50  # ...or only the first: a causal mask would still see it at the end
    with torch.no_grad():
        base = tower(tokens)
        assert (tower(changed) - base).abs().max() > 1e-4 and (tower(earlier) - base).abs().max() > 1e-4
    with pytest.raises(ValueError, match="at most 8"):
        tower(torch.zeros(1, 9, dtype=torch.long))
