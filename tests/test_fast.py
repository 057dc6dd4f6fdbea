"""nets/fast.py: oneDNN's CPU path gives the plain PyTorch path's features for every tower kind, and never
answers with the packed copy of weights that have since changed."""
from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
from torch import nn

from clip import CLIP
from nets import CLIPConfig, VisionConfig, build_model
from nets.fast import PACK_AFTER, Matmul, accelerate, available
from tests.conftest import SMALL, bert_config, random_tokens

pytestmark = pytest.mark.skipif(not available(), reason="this PyTorch has no oneDNN")

SMALL_RN = CLIPConfig(embed_dim=48, vision=VisionConfig(kind="resnet", image_size=64, patch_size=32, width=16,
                                                        layers=(1, 2, 1, 1), heads=2), text=SMALL.text)
GELU = dataclasses.replace(SMALL, vision=dataclasses.replace(SMALL.vision, activation="gelu"),
                           text=dataclasses.replace(SMALL.text, activation="gelu"))
CONFIGS = {"vit-quick_gelu": SMALL, "vit-gelu": GELU, "resnet": SMALL_RN,
           "bert-pooler": bert_config("bert-pooler", 52), "bert-cls": bert_config("bert-cls", 52)}
SLOW_KINDS = {"resnet", "bert-pooler", "bert-cls"}  # seconds each on 2 cores: the quick loop keeps the ViT ones


def random_model(config: CLIPConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(config).eval()
    with torch.no_grad():
        # Biases and gains off their 0/1 init (the ResNet's zeroed gains too), so that every parameter counts.
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(float(p.mean()), 0.1)
    return model


def inputs(config: CLIPConfig, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.randn(n, 3, config.vision.image_size, config.vision.image_size,
                         generator=torch.Generator().manual_seed(n))
    if config.text.is_bert:
        tokens = torch.zeros(n, config.text.context_length, dtype=torch.long)
        for i in range(n):
            length = 3 + 5 * i
            tokens[i, 0], tokens[i, 1:length - 1], tokens[i, length - 1] = 101, torch.arange(200, 198 + length), 102
    else:
        tokens = random_tokens(n, config.text.vocab_size, config.text.context_length, seed=n)
    return pixels, tokens


def features(model: nn.Module, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        return model.encode_image(pixels), model.encode_text(tokens)


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k in SLOW_KINDS else k for k in CONFIGS])
def test_fast_features_equal_eager_within_1e_4_for_every_tower_kind(kind):
    config = CONFIGS[kind]
    eager = random_model(config)
    fast = copy.deepcopy(eager)
    assert accelerate(fast)
    for n in (1, 3):
        pixels, tokens = inputs(config, n)
        want = features(eager, pixels, tokens)
        for _ in range(PACK_AFTER + 1):  # before the weights are packed, and after
            got = features(fast, pixels, tokens)
            for g, w in zip(got, want):
                assert (g - w).abs().max() < 1e-4, kind
    rerouted = [m for m in fast.modules() if isinstance(m.__dict__.get("forward"), functools.partial)]
    assert rerouted, "accelerate changed nothing"
    assert list(fast.state_dict()) == list(eager.state_dict())


def test_weights_changed_after_packing_are_used_not_the_stale_copy():
    eager, other = random_model(SMALL, seed=0), random_model(SMALL, seed=1)
    fast = copy.deepcopy(eager)
    accelerate(fast)
    pixels, tokens = inputs(SMALL, 2)
    for _ in range(PACK_AFTER + 1):
        features(fast, pixels, tokens)
    assert any(m.packed is not None for m in _matmuls(fast)), "nothing was packed: the test would prove nothing"
    fast.load_state_dict(other.state_dict())  # copies in place: the same tensors, new contents
    for g, w in zip(features(fast, pixels, tokens), features(other, pixels, tokens)):
        assert (g - w).abs().max() < 1e-4
    for _ in range(PACK_AFTER):
        features(fast, pixels, tokens)
    block = fast.visual.transformer.resblocks[0]
    block.attn.in_proj_weight = nn.Parameter(other.visual.transformer.resblocks[1].attn.in_proj_weight.clone())
    block.mlp.c_fc.weight = nn.Parameter(torch.zeros_like(block.mlp.c_fc.weight))  # a new tensor, not an update
    reference = random_model(SMALL)
    reference.load_state_dict(fast.state_dict())
    with torch.inference_mode():
        assert (fast.encode_image(pixels) - reference.encode_image(pixels)).abs().max() < 1e-4


def _matmuls(model: nn.Module) -> list[Matmul]:
    found = [matmul for m in model.modules() if isinstance(m.__dict__.get("forward"), functools.partial)
             for matmul in m.forward.args[1:] if isinstance(matmul, Matmul)]
    return found + [m.project for m in model.modules() if isinstance(m.__dict__.get("project"), Matmul)]


def test_training_an_accelerated_model_gets_eager_gradients():
    eager = random_model(SMALL)
    fast = copy.deepcopy(eager)
    accelerate(fast)
    pixels, tokens = inputs(SMALL, 2)
    for model in (eager, fast):
        model.zero_grad()
        image, text = model.encode_image(pixels), model.encode_text(tokens)
        (image.square().sum() + text.square().sum()).backward()
    for (name, p), q in zip(eager.named_parameters(), fast.parameters()):
        assert (p.grad is None) == (q.grad is None), name  # logit_scale takes no part in encoding
        assert p.grad is None or torch.equal(p.grad, q.grad), name  # the plain ops, so exactly


def test_subclasses_of_linear_keep_their_own_forward():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Linear(8, 8), Doubled(8, 8))
    x = torch.randn(3, 8)
    with torch.inference_mode():
        want = model(x)
        accelerate(model)
        assert "forward" in model[0].__dict__ and "forward" not in model[1].__dict__
        assert (model(x) - want).abs().max() < 1e-5


@pytest.mark.slow
def test_a_timm_tower_unknown_to_accelerate_keeps_its_features_within_1e_4():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    tower = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=0).eval()
    fast = copy.deepcopy(tower)
    accelerate(fast)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        want = tower(pixels)
        for _ in range(PACK_AFTER + 1):
            assert (fast(pixels) - want).abs().max() < 1e-4


def test_clip_wrapper_is_accelerated_on_the_cpu_and_equals_the_plain_path_within_1e_4():
    torch.manual_seed(0)
    fast = CLIP(model_path="", phi="tiny/VIT-T-8", cuda=False, precision="fp32")
    plain = CLIP(model_path="", phi="tiny/VIT-T-8", cuda=False, precision="fp32", onednn=False)
    plain.net.load_state_dict(fast.net.state_dict())
    assert _matmuls(fast.net) and not _matmuls(plain.net)
    pixels, tokens = inputs(fast.net.config, 2)
    for _ in range(PACK_AFTER + 1):
        got, want = fast.detect_image_for_eval(pixels, tokens), plain.detect_image_for_eval(pixels, tokens)
        for g, w in zip(got, want):
            assert (g - w).abs().max() < 1e-4


def test_a_clip_built_inside_inference_mode_answers_as_one_built_outside():
    # `with torch.inference_mode(): model = CLIP(...)` is a common idiom; tensors made there keep no version
    # counter, which the packed weights' staleness check reads.
    torch.manual_seed(0)
    outside = CLIP(model_path="", phi="tiny/VIT-T-8", cuda=False, precision="fp32")
    with torch.inference_mode():
        inside = CLIP(model_path="", phi="tiny/VIT-T-8", cuda=False, precision="fp32")
        inside.net.load_state_dict(outside.net.state_dict())
        pixels, tokens = inputs(outside.net.config, 2)
        for _ in range(PACK_AFTER + 1):
            got, want = inside.detect_image_for_eval(pixels, tokens), outside.detect_image_for_eval(pixels, tokens)
            assert all((g - w).abs().max() < 1e-5 for g, w in zip(got, want))


def test_layers_with_inference_tensors_run_unpacked_and_see_every_update():
    # A net built inside inference mode by hand: its weights cannot say when they change, so none is packed.
    torch.manual_seed(0)
    with torch.inference_mode():
        layer = nn.Linear(16, 8)
        fast = copy.deepcopy(layer)
        accelerate(fast)
        x = torch.randn(3, 16)
        for _ in range(PACK_AFTER + 1):
            assert (fast(x) - layer(x)).abs().max() < 1e-5
        for net in (layer, fast):
            net.weight.mul_(2)  # in place, as load_state_dict writes
        assert (fast(x) - layer(x)).abs().max() < 1e-5


@pytest.mark.parametrize("siglip2", [False, True], ids=["siglip", "siglip2"])
def test_siglip_models_keep_their_features_within_1e_4_with_every_mlp_fused(monkeypatch, siglip2):
    """A whole SigLIP model as the table builds it: timm's image tower (MAP head, exact GELU) and our SigLIP text
    tower (exact GELU; SigLIP 2's tanh GELU), every MLP's activation fused into oneDNN's matmul."""
    timm = pytest.importorskip("timm")
    from nets.open_clip_configs import from_open_clip
    from tests.test_siglip_towers import TINY_OVERRIDES, TINY_TRUNK, _tiny_open_clip_config

    real_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, *a, **k: real_create(
        *(("vit_base_patch16_siglip_224", *a) if name == TINY_TRUNK else (name, *a)),
        **({**k, **TINY_OVERRIDES} if name == TINY_TRUNK else k)))
    torch.manual_seed(0)
    eager = build_model(from_open_clip(_tiny_open_clip_config(siglip2))).eval()
    with torch.no_grad():
        for p in eager.parameters():  # the attention-pool latent, gains and biases too
            p.add_(torch.randn_like(p) * 0.05)
    fast = copy.deepcopy(eager)
    assert accelerate(fast)
    mlps = [m for m in fast.modules() if hasattr(m, "fc1") or hasattr(m, "c_fc")]
    assert mlps and all(isinstance(m.__dict__.get("forward"), functools.partial) for m in mlps), "an MLP not fused"
    pixels, tokens = torch.randn(3, 3, 32, 32), torch.randint(2, 300, (3, 16))
    want = features(eager, pixels, tokens)
    for _ in range(PACK_AFTER + 1):
        for g, w in zip(features(fast, pixels, tokens), want):
            assert (g - w).abs().max() < 1e-4


def test_openmp_threads_sleep_while_they_wait_unless_the_user_says_otherwise():
    """Spinning OpenMP threads collapse single-image speed 16x when another process holds a core (utils/__init__)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = "import clip, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                          cwd=root).stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                          cwd=root).stdout.strip() == "ACTIVE"


def _module_path_calls(monkeypatch) -> list:
    """Each call of a Transformer's own forward (the modules), recorded."""
    from nets.transformer import Transformer

    calls, forward = [], Transformer.forward

    def counted(self, *args, **kwargs):
        calls.append(self)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Transformer, "forward", counted)
    return calls


@pytest.mark.parametrize("kind", ["vit-quick_gelu", "vit-gelu"])
def test_flat_transformers_answer_bit_for_bit_as_their_modules(monkeypatch, kind):
    config = CONFIGS[kind]
    fast = random_model(config)
    accelerate(fast)
    modules_only = copy.deepcopy(fast)
    for t in modules_only.modules():
        if type(t).__name__ == "Transformer":
            del t.forward  # its own forward again: the modules, on the same oneDNN path
    calls = _module_path_calls(monkeypatch)
    for n in (1, 3):  # one caption (pooled by position) and three of different lengths (packed)
        pixels, tokens = inputs(config, n)
        for _ in range(PACK_AFTER + 1):
            want = features(modules_only, pixels, tokens)
            got = features(fast, pixels, tokens)
        del calls[:]
        got = features(fast, pixels, tokens)
        assert not [c for c in calls if any(c is t for t in fast.modules())], "the flat path did not answer"
        assert all(torch.equal(g, w) for g, w in zip(got, want)), kind


def test_the_flat_path_sees_updates_and_swapped_modules(monkeypatch):
    fast, other = random_model(SMALL, seed=0), random_model(SMALL, seed=1)
    accelerate(fast)
    pixels, tokens = inputs(SMALL, 2)
    calls = _module_path_calls(monkeypatch)

    def check():
        reference = random_model(SMALL)
        reference.load_state_dict(fast.state_dict())
        for g, w in zip(features(fast, pixels, tokens), features(reference, pixels, tokens)):
            assert (g - w).abs().max() < 1e-5

    def settle():  # until the flat path answers both towers
        for _ in range(PACK_AFTER + 1):
            features(fast, pixels, tokens)
        del calls[:]
        features(fast, pixels, tokens)
        assert not [c for c in calls if any(c is t for t in fast.modules())]

    settle()
    with torch.no_grad():
        fast.text.transformer.resblocks[0].ln_1.weight.mul_(3)  # in place: a LayerNorm no matmul holds
    check()
    settle()
    block = fast.visual.transformer.resblocks[-1]
    block.ln_2 = copy.deepcopy(other.visual.transformer.resblocks[0].ln_2)  # another module in its place
    for _ in range(PACK_AFTER + 1):
        check()
    assert any(c is fast.visual.transformer for c in calls)  # the modules answer the swapped tower from now on
    fast.load_state_dict(other.state_dict())
    check()


def test_an_mlp_layer_swapped_after_accelerate_runs_its_own_forward():
    # As LoRA wraps a layer: the base weight is still `weight`, but the forward adds the adapter's term.
    class WithDelta(nn.Module):
        def __init__(self, base: nn.Linear):
            super().__init__()
            self.base, self.delta = base, nn.Linear(base.in_features, base.out_features, bias=False)

        @property
        def weight(self):
            return self.base.weight

        def forward(self, x):
            return self.base(x) + self.delta(x)

    eager = random_model(SMALL)
    fast = copy.deepcopy(eager)
    accelerate(fast)
    pixels, tokens = inputs(SMALL, 2)
    for _ in range(PACK_AFTER + 1):
        features(fast, pixels, tokens)
    for model in (eager, fast):
        mlp = model.visual.transformer.resblocks[0].mlp
        torch.manual_seed(1)
        mlp.c_fc = WithDelta(mlp.c_fc)
    for _ in range(PACK_AFTER + 1):
        for g, w in zip(features(fast, pixels, tokens), features(eager, pixels, tokens)):
            assert (g - w).abs().max() < 1e-4


def test_bf16_attention_on_the_cpu_runs_in_fp32_and_answers_in_bf16():
    from nets.transformer import Packing, Pooled, attend, sdpa

    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(3, 13, 3 * 64, generator=g) * 2).bfloat16()
    keep = torch.arange(13) <= torch.tensor([12, 5, 8])[:, None]
    packing = Packing(keep)
    for kwargs in ({}, {"pooled": Pooled(torch.tensor([12, 5, 8]))}):
        out = attend(qkv, 4, True, **kwargs)
        assert out.dtype == torch.bfloat16 and torch.equal(out, attend(qkv.float(), 4, True, **kwargs).bfloat16())
    packed = packing.pack(qkv)
    assert torch.equal(attend(packed, 4, True, packing), attend(packed.float(), 4, True, packing).bfloat16())
    q, k, v = (torch.randn(2, 4, n, 16, generator=g).bfloat16() for n in (1, 9, 9))  # a decoding step's shapes
    mask = torch.rand(2, 1, 1, 9, generator=g) > 0.3
    F = torch.nn.functional
    assert torch.equal(sdpa(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask).bfloat16())
    trained = qkv.clone().requires_grad_()  # with autograd the op is the model's own dtype's
    assert torch.equal(attend(trained, 4, True).detach(), torch.nn.functional.scaled_dot_product_attention(
        *qkv.view(3, 13, 3, 4, 16).permute(2, 0, 3, 1, 4), is_causal=True).transpose(1, 2).reshape(3, 13, 64))


def test_a_transposed_matmul_is_x_at_the_weight_packed_and_exactly_that_op_unpacked():
    g = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(64, 300, generator=g))  # (in, out), as CoCa's vocabulary projection
    x = torch.randn(3, 5, 64, generator=g)
    matmul = Matmul(transposed=True)
    with torch.no_grad():
        assert torch.equal(matmul(x, weight), x @ weight) and matmul.packed is None  # not packed yet: the op itself
        for _ in range(PACK_AFTER):
            out = matmul(x, weight)
        assert matmul.packed is not None and (out - x @ weight).abs().max() < 1e-5
        weight.mul_(-2)  # an in-place update: packed again from the new values
        for _ in range(PACK_AFTER):
            out = matmul(x, weight)
        assert (out - x @ weight).abs().max() < 1e-5
    assert torch.equal(matmul(x, weight), x @ weight)  # with autograd: the op itself
