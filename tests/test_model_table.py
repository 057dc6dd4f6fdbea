"""The model table as data: every phi builds what it built before the table took one encoding, and a tower kind
is a row of nets/clip.py's registries."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from torch import nn

from nets import build_model, clip, configs, get_config
from nets.configs import MODEL_CONFIGS, CLIPConfig
from nets.hf_rows import HF_ROWS
from nets.zoo_rows import ZOO
from tests.conftest import SMALL

# Every phi's CLIPConfig.to_dict() as the table of positional tuples and an import-time loop gave it (main at
# 95f4e6c), in the table's order: phi_of names the first row that matches, so the order is part of the contract.
BEFORE = json.loads((Path(__file__).parent / "model_configs_before.json").read_text(encoding="utf-8"))


def test_every_phi_is_the_config_it_was_in_the_same_order():
    # Rows added since (SigLIP's, CLIPA's, MetaCLIP 2's with their QuickGELU twins, the zoo's, the HF text towers')
    # come after, so phi_of still names the same row for every old architecture.
    assert list(MODEL_CONFIGS)[:len(BEFORE)] == list(BEFORE)
    worldwide = {f"{name}{twin}" for name in configs.WORLDWIDE for twin in ("", "-quickgelu")}
    assert set(MODEL_CONFIGS) - set(BEFORE) == set(configs.SIGLIP) | set(configs.CLIPA) | worldwide | set(ZOO) | \
        set(HF_ROWS) | set(configs.COCA)
    for phi, before in BEFORE.items():
        # asdict compares the fields that == skips (dropout, initializer_range) too.
        assert asdict(get_config(phi)) == asdict(CLIPConfig.from_dict(before)), phi


def test_the_table_is_json_data():
    assert json.loads(json.dumps(MODEL_CONFIGS)) == {phi: json.loads(json.dumps(get_config(phi).to_dict()))
                                                     for phi in MODEL_CONFIGS}


def test_every_kind_has_a_builder():
    assert set(clip.IMAGE_TOWERS) == set(configs.VISION_KINDS)
    assert set(clip.TEXT_TOWERS) == set(configs.TEXT_KINDS)


class _PlantedTower(nn.Module):
    def __init__(self, config, embed_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, embed_dim, config.patch_size, config.patch_size)  # CLIP.dtype reads conv1

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.conv1(pixels).mean((-2, -1))


def test_a_new_image_kind_is_a_row(monkeypatch):
    monkeypatch.setattr(configs, "VISION_KINDS", (*configs.VISION_KINDS, "planted"))
    monkeypatch.setitem(clip.IMAGE_TOWERS, "planted", _PlantedTower)
    config = replace(SMALL, vision=replace(SMALL.vision, kind="planted"))
    model = build_model(config)
    assert isinstance(model.visual, _PlantedTower)
    assert {k for k in model.state_dict() if k.startswith("visual.")} == {"visual.conv1.weight", "visual.conv1.bias"}
    assert model.encode_image(torch.zeros(2, 3, 32, 32)).shape == (2, SMALL.embed_dim)
    # The text tower is the table's, under OpenAI's top-level keys.
    assert "token_embedding.weight" in model.state_dict() and "text_projection" in model.state_dict()


def test_a_kind_without_a_builder_is_named(monkeypatch):
    config = replace(SMALL, text=replace(SMALL.text, kind="hf-text"))
    with pytest.raises(ValueError, match="no builder for tower kind 'hf-text'; known: openai, bert-pooler, bert-cls"):
        build_model(config)
