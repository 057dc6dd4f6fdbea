"""OpenAI's ResNet CLIPs: exact against open_clip on random weights, every size's shapes, and phi='auto'."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from nets import CLIPConfig, TextConfig, VisionConfig, build_model, get_config, infer_config, phi_of
from tests.conftest import random_tokens, traces_on_purpose
from utils.errors import UserError

open_clip = pytest.importorskip("open_clip")

TOL = 1e-4
# Two blocks in some stages (the blocks after a stage's first), and 16 heads of width 32 in the attention
# pool instead of OpenAI's 64.
SMALL_RN = CLIPConfig(embed_dim=48, vision=VisionConfig(kind="resnet", image_size=64, patch_size=32, width=16,
                                                        layers=(2, 1, 1, 2), heads=16),
                      text=TextConfig(kind="openai", context_length=77, vocab_size=1000, width=64, layers=2, heads=2))


def open_clip_model(config: CLIPConfig):
    """open_clip's own CLIP with the sizes of `config` (QuickGELU, as OpenAI's), in eval mode."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    v, t = config.vision, config.text
    vision = CLIPVisionCfg(layers=list(v.layers), width=v.width, head_width=v.width * 32 // v.heads,
                           image_size=v.image_size, patch_size=None)
    text = CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                       layers=t.layers)
    return CLIP(config.embed_dim, vision, text, quick_gelu=True).eval()


def perturb_(model: torch.nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """open_clip's init with what it leaves at a constant made random: BatchNorm gains (bn3's start at zero,
    which would hide every residual branch), biases and statistics (variances kept positive). Returns the
    state dict."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith("running_var"):
                value.copy_(torch.rand(value.shape, generator=g) + 0.5)
            elif value.is_floating_point() and (value.ndim == 1 or key.endswith("running_mean")):
                value.add_(0.1 * torch.randn(value.shape, generator=g))
    return model.state_dict()


def _weights(state_dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if not k.endswith("attn_mask")}


def assert_features_match(ours, reference, image_size: int, vocab_size: int, images: int = 2) -> tuple[float, float]:
    pixels = torch.randn(images, 3, image_size, image_size, generator=torch.Generator().manual_seed(2))
    tokens = random_tokens(3, vocab_size, max_len=20)
    with torch.no_grad():
        image = (ours.encode_image(pixels) - reference.encode_image(pixels)).abs().max().item()
        text = (ours.encode_text(tokens) - reference.encode_text(tokens)).abs().max().item()
    assert image < TOL and text < TOL, (image, text)
    return image, text


def test_small_resnet_equals_open_clip_within_1e_4():
    torch.manual_seed(0)
    reference = open_clip_model(SMALL_RN)
    ours = build_model(SMALL_RN).eval()
    ours.load_state_dict(_weights(perturb_(reference)), strict=True)
    assert_features_match(ours, reference, 64, 1000)
    # The same test with the weights of one BatchNorm moved: the comparison does see the ResNet.
    with torch.no_grad():
        ours.visual.layer4[1].bn3.running_mean += 1
    with pytest.raises(AssertionError):
        assert_features_match(ours, reference, 64, 1000)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["RN50", "RN101-quickgelu"])
def test_open_clip_resnet_features_within_1e_4(name):
    torch.manual_seed(0)
    reference = open_clip.create_model(name).eval()  # open_clip's own sizes, for its name
    with torch.device("meta"):  # no init: every weight comes from the reference
        ours = build_model(get_config(name)).eval()
    ours.load_state_dict(_weights(perturb_(reference)), strict=True, assign=True)
    image, text = assert_features_match(ours, reference, ours.config.vision.image_size, 49408, images=1)
    print(f"{name}: image {image:.1e}, text {text:.1e}")


def _shapes(model) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in _weights(model.state_dict()).items()}


@pytest.mark.slow
@pytest.mark.parametrize("size", ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64"])
def test_every_open_clip_resnet_has_its_shapes_heads_and_activation(size):
    references = {}
    for name, reference_name in ((size, size), (f"{size}-quickgelu", f"{size}-quickgelu"),
                                 (f"openai/{size}", f"{size}-quickgelu")):  # OpenAI's weights: open_clip's -quickgelu
        with torch.device("meta"):
            if reference_name not in references:
                references[reference_name] = open_clip.create_model(reference_name, device="meta")
            reference = references[reference_name]
            ours = build_model(get_config(name))
        assert _shapes(ours) == _shapes(reference), name
        assert ours.visual.attnpool.heads == reference.visual.attnpool.num_heads
        assert ours.config.vision.image_size == reference.visual.image_size
        assert ours.config.text.heads == reference.transformer.resblocks[0].attn.num_heads
        activation = ours.config.text.activation
        assert (activation == "quick_gelu") == (type(reference.transformer.resblocks[0].mlp.gelu).__name__ ==
                                                "QuickGELU"), name
        # phi='auto' finds the sizes and heads from the shapes alone: OpenAI's name (a bare file is OpenAI's).
        assert phi_of(infer_config(ours.state_dict())) == f"openai/{size}"


@pytest.mark.slow
def test_tiny_resnet_forward_and_auto_config():
    model = build_model(get_config("tiny/RN-T")).eval()
    pixels = torch.randn(3, 3, 64, 64)
    image_features, text_features, _ = model(pixels, random_tokens(2, 49408))
    assert image_features.shape == (3, 128) and text_features.shape == (2, 128)
    assert phi_of(infer_config(model.state_dict())) == "tiny/RN-T"
    assert "visual.attnpool.c_proj.weight" in model.state_dict() and "visual.layer4.0.downsample.0.weight" in \
        model.state_dict()


def test_resnet_config_round_trips_through_a_dict_and_json():
    config = get_config("RN101-quickgelu")
    assert CLIPConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert hash(config) == hash(CLIPConfig.from_dict(config.to_dict()))
    with pytest.raises(ValueError, match="4 stage depths"):
        VisionConfig(kind="resnet", image_size=224, patch_size=32, width=64, layers=12, heads=32)


def test_resnet_of_sizes_in_no_row_is_refused_not_guessed():
    state_dict = build_model(SMALL_RN).state_dict()  # its 16 heads are in no table row
    with pytest.raises(UserError, match="heads"):
        infer_config(state_dict)


@pytest.mark.slow
@traces_on_purpose
def test_openai_torchscript_resnet_archive_loads_exactly(tmp_path):
    from tests.test_weights import save_openai_torchscript
    from utils.weights.load import load_model

    torch.manual_seed(0)
    reference = open_clip_model(get_config("tiny/RN-T"))
    perturb_(reference)
    path = tmp_path / "RN-T.pt"
    save_openai_torchscript(reference, 64, 49408, path)  # leaves the reference with the archive's fp16 values
    model, phi = load_model(path, "auto")
    assert phi == "tiny/RN-T"
    assert_features_match(model.eval(), reference, 64, 49408)


@pytest.mark.slow
def test_grad_checkpointing_recomputes_blocks_only_while_batch_norm_is_frozen():
    torch.manual_seed(0)
    model = build_model(get_config("tiny/RN-T"))
    perturb_(model)
    plain = build_model(get_config("tiny/RN-T"))
    plain.load_state_dict(model.state_dict())
    model.set_grad_checkpointing(True)
    calls, block = [], model.visual.layer2[0]
    forward = block.forward
    block.forward = lambda x: calls.append(1) or forward(x)  # counts recomputations too, which skip hooks
    pixels = torch.randn(4, 3, 64, 64)
    for train_stats in (False, True):  # eval-mode BatchNorm (frozen statistics), then train mode
        calls.clear()
        for net in (model, plain):
            net.visual.train(train_stats)
            net.zero_grad()
            net.encode_image(pixels).square().sum().backward()
        assert len(calls) == (1 if train_stats else 2)  # recomputed in the backward pass only when frozen
        for (name, a), b in zip(model.visual.named_parameters(), plain.visual.parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
        # Statistics move once per forward, as without checkpointing.
        torch.testing.assert_close(model.visual.layer2[0].bn1.running_mean, plain.visual.layer2[0].bn1.running_mean)


@pytest.mark.slow
def test_open_clip_hub_folder_of_a_custom_gelu_resnet_loads_with_auto_within_1e_4(tmp_path):
    from utils.weights.load import load_model

    # SMALL_RN's sizes (its 16 pool heads are in no table row) with exact GELU, as open_clip's hub layout says.
    cfg = dict(embed_dim=48, vision_cfg=dict(image_size=64, layers=[2, 1, 1, 2], width=16, head_width=32),
               text_cfg=dict(context_length=77, vocab_size=1000, width=64, heads=2, layers=2))
    torch.manual_seed(0)
    reference = open_clip.model.CLIP(**cfg).eval()
    perturb_(reference)
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.save(reference.state_dict(), folder / "open_clip_pytorch_model.bin")
    model, phi = load_model(folder, "auto")
    assert phi == "custom" and model.config.vision == dataclasses.replace(SMALL_RN.vision, activation="gelu")
    assert model.config.text.activation == "gelu"
    assert_features_match(model.eval(), reference, 64, 1000)
