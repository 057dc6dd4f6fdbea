"""phi='auto' is exact where the architecture is recorded (this project's files, transformers' and open_clip's
configs) and says what it assumes where it is not; a named phi that a record contradicts is refused."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch import nn

from nets import MODEL_CONFIGS, build_model, get_config
from nets.configs import phi_of, same_architecture, with_activation
from tests.conftest import SMALL, random_tokens
from tests.test_models import bert_tokens
from tests.test_training import toy, train, train_args  # noqa: F401  (toy is a fixture)
from utils.errors import UserError
from utils.weights.arch import arch_path, write_arch
from utils.weights.layouts import config_from_transformers, transformers_config
from utils.weights.load import init_model, load_model, read_checkpoint, resolve

TOL = 1e-4


def _perturb(model: nn.Module) -> nn.Module:
    """Gains and biases away from their 1/0 init, so a wrong head split or activation shows."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def test_transformers_clip_with_gelu_and_head_width_32_loads_exactly_with_auto(tmp_path):
    # The towers' head widths are 32 (not 64) and their MLPs not 4x: shapes alone would get all of it wrong.
    config = transformers.CLIPConfig(
        vision_config=dict(hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=3,
                           image_size=32, patch_size=8, hidden_act="gelu"),
        text_config=dict(hidden_size=64, intermediate_size=150, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=1000, bos_token_id=998, eos_token_id=999, hidden_act="gelu"),
        projection_dim=40)
    torch.manual_seed(0)
    hf = _perturb(transformers.CLIPModel(config))
    hf.save_pretrained(tmp_path / "hf")
    model, phi = load_model(tmp_path / "hf", "auto")
    assert phi == "custom" and model.config.vision.activation == model.config.text.activation == "gelu"
    assert (model.config.vision.heads, model.config.vision.mlp_width) == (3, 200)
    pixels, tokens = torch.randn(2, 3, 32, 32), random_tokens(3, 1000)
    with torch.no_grad():
        assert (model.eval().encode_image(pixels) -
                hf.get_image_features(pixel_values=pixels).pooler_output).abs().max() < TOL
        assert (model.encode_text(tokens) - hf.get_text_features(input_ids=tokens).pooler_output).abs().max() < TOL


def test_chinese_clip_with_two_heads_of_96_loads_exactly_with_auto(tmp_path):
    config = transformers.ChineseCLIPConfig(
        vision_config=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(vocab_size=21128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=64),
        projection_dim=40)
    torch.manual_seed(0)
    hf = _perturb(transformers.ChineseCLIPModel(config))
    hf.save_pretrained(tmp_path / "cn")
    model, _ = load_model(tmp_path / "cn", "auto")
    assert model.config.vision.heads == 2 and model.config.text.kind == "bert-cls"
    pixels, tokens = torch.randn(2, 3, 32, 32), bert_tokens(3, 52)
    with torch.no_grad():
        assert (model.eval().encode_image(pixels) -
                hf.get_image_features(pixel_values=pixels).pooler_output).abs().max() < TOL
        hf_text = hf.get_text_features(input_ids=tokens, attention_mask=(tokens != 0).long(),
                                       token_type_ids=torch.zeros_like(tokens)).pooler_output
        assert (model.encode_text(tokens) - hf_text).abs().max() < TOL


def test_a_named_phi_that_the_config_contradicts_is_refused(tmp_path):
    # tiny/VIT-T-8's shapes, GELU: the weights would load into the named QuickGELU phi and compute something else.
    tiny = get_config("tiny/VIT-T-8")
    gelu = with_activation(tiny, "gelu")
    torch.save(build_model(gelu).state_dict(), tmp_path / "w.pth")
    write_arch(tmp_path / "w.pth", gelu)
    with pytest.raises(UserError) as err:
        load_model(tmp_path / "w.pth", "tiny/VIT-T-8")
    assert "w.pth.json" in str(err.value) and "activation quick_gelu vs gelu" in str(err.value)
    model, phi = load_model(tmp_path / "w.pth", "auto")
    assert phi == "custom" and model.config == gelu


def test_a_bare_state_dict_loads_as_quickgelu_and_says_so_in_one_line(tmp_path, capsys):
    torch.save(build_model(get_config("tiny/VIT-T-8")).state_dict(), tmp_path / "tiny.pth")
    model, phi = load_model(tmp_path / "tiny.pth", "auto")
    assert phi == "tiny/VIT-T-8" and model.config.vision.activation == "quick_gelu"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "QuickGELU" in err[0] and "tiny.pth.json" in err[0]  # no GELU twin in the table


def test_heads_that_no_table_row_or_record_knows_are_refused_in_one_line(tmp_path):
    torch.save(build_model(SMALL).state_dict(), tmp_path / "custom.pth")
    with pytest.raises(UserError) as err:
        load_model(tmp_path / "custom.pth", "auto")
    message = str(err.value)
    assert "\n" not in message and "custom.pth" in message and "heads" in message and "pass the phi" in message


def test_a_record_for_other_bytes_is_ignored(tmp_path, capsys):
    tiny = get_config("tiny/VIT-T-8")
    path = tmp_path / "w.pth"
    torch.save(build_model(with_activation(tiny, "gelu")).state_dict(), path)
    write_arch(path, with_activation(tiny, "gelu"))
    torch.save({k: v.half() for k, v in build_model(tiny).state_dict().items()}, path)  # replaced by hand
    assert read_checkpoint(path).config is None
    assert "the record is ignored" in capsys.readouterr().err


@pytest.mark.slow
def test_training_weights_carry_their_architecture_and_load_with_auto_exactly(toy, tmp_path, monkeypatch, capsys):
    # A GELU phi: its weights have the shapes of tiny/VIT-T-8's, so only the record can tell them apart.
    gelu = with_activation(get_config("tiny/VIT-T-8"), "gelu")
    monkeypatch.setitem(MODEL_CONFIGS, "tiny-gelu/VIT-T-8", gelu.to_dict())
    result = train(train_args(toy, tmp_path, phi="tiny-gelu/VIT-T-8", Epoch=1), capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("last_epoch_weights.pth", "best_epoch_weights.pth"):
        path = tmp_path / name
        record = json.loads(arch_path(path).read_text())
        assert record["phi"] == "tiny-gelu/VIT-T-8" and record["bytes"] == path.stat().st_size
        plain = torch.load(path, weights_only=True)  # still a plain OpenAI-key state dict
        build_model(gelu).load_state_dict(plain, strict=True)
        model, phi = load_model(path, "auto")
        assert phi == "tiny-gelu/VIT-T-8" and model.config == gelu
        assert all(torch.equal(model.state_dict()[k], v) for k, v in plain.items())
    checkpoint = read_checkpoint(tmp_path / "last_epoch_weights.pth")
    assert resolve(checkpoint, "auto")[2] == []  # exact: nothing to warn about


def test_a_record_written_by_hand_without_bytes_is_read(tmp_path):
    path = tmp_path / "custom.pth"
    torch.save(build_model(SMALL).state_dict(), path)
    record = {"format": "clip-pytorch architecture", "phi": "custom", "clip": {
        "embed_dim": SMALL.embed_dim,
        "vision": {k: getattr(SMALL.vision, k) for k in ("image_size", "patch_size", "width", "layers", "heads")},
        "text": {k: getattr(SMALL.text, k) for k in ("kind", "context_length", "vocab_size", "width", "layers",
                                                      "heads")}}}
    arch_path(path).write_text(json.dumps(record))
    model, phi = load_model(path, "auto")
    assert phi == "custom" and model.config == SMALL


@pytest.mark.parametrize("phi", ["ViT-bigG-14", "ViT-g-14-quickgelu", "ViT-H-14", "openai/VIT-B-32", "cn-clip/VIT-B-16"])
def test_transformers_config_round_trips_heads_mlp_and_activation(phi):
    config = get_config(phi)
    back = config_from_transformers(transformers_config(config).to_dict())
    assert same_architecture(back, config) and phi_of(back) == phi_of(config)


def test_an_image_tower_taken_alone_is_checked_against_the_record_too(tmp_path):
    # tiny-cn takes only the image tower of an OpenAI-text checkpoint (with BERT for text): it must be QuickGELU.
    gelu = with_activation(get_config("tiny/VIT-T-8"), "gelu")
    torch.save(build_model(gelu).state_dict(), tmp_path / "w.pth")
    write_arch(tmp_path / "w.pth", gelu)
    with pytest.raises(UserError, match="image activation quick_gelu vs gelu"):
        init_model("tiny-cn/VIT-T-8", tmp_path / "w.pth", bert_path=tmp_path / "bert")
