"""Tower forwards and exact parity with OpenAI's architecture and `transformers` on random weights."""
from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from nets import MODEL_CONFIGS, TextConfig, build_model, get_config, infer_config, phi_of
from nets.text_bert import bert_config as to_bert_config
from tests.conftest import SMALL, bert_config, random_tokens, reference_for, traces_on_purpose
from utils.weights.layouts import openai_to_transformers, transformers_config

TOL = 1e-5


def test_every_phi_in_the_table_builds_a_consistent_config():
    for phi in MODEL_CONFIGS:
        config = get_config(phi)
        # timm's patch embedding drops the remainder: SO400M-14 at 384 px is a 27 x 27 grid, as trained.
        assert config.vision.image_size % config.vision.patch_size == 0 or config.vision.kind == "timm"
        # timm towers without attention (ConvNeXt) have no heads.
        assert (config.vision.kind == "timm" and config.vision.heads == 0) or config.vision.width % config.vision.heads == 0
        assert config.text.width % config.text.heads == 0


def test_unknown_phi_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        get_config("openai/VIT-B-99")
    assert "openai/VIT-B-99" in str(err.value) and "tiny/VIT-T-8" in str(err.value)


@pytest.mark.parametrize("phi", ["tiny/VIT-T-8", "tiny-cn/VIT-T-8"])
def test_tiny_towers_forward_shapes_and_auto_config(phi):
    model = build_model(get_config(phi)).eval()
    config = model.config
    pixels = torch.randn(3, 3, config.vision.image_size, config.vision.image_size)
    tokens = torch.zeros(2, config.text.context_length, dtype=torch.long)
    tokens[:, :3] = torch.tensor([101, 872, 102] if config.text.is_bert else [49406, 320, 49407])
    image_features, text_features, scale = model(pixels, tokens)
    assert image_features.shape == (3, config.embed_dim) and text_features.shape == (2, config.embed_dim)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert phi_of(infer_config(model.state_dict())) == phi


def test_bert_training_settings_reach_bert_but_not_the_architecture_match():
    config = get_config("tiny-cn/VIT-T-8")
    bert = build_model(config).text.transformer.config
    assert bert.hidden_dropout_prob == bert.attention_probs_dropout_prob == config.text.dropout == 0.0
    assert bert.initializer_range == config.text.initializer_range == 0.05
    # A checkpoint cannot tell dropout or the init scale, so the table entry is still recognised.
    inferred = infer_config(build_model(config).state_dict())
    assert inferred.text.dropout == 0.1 and phi_of(inferred) == "tiny-cn/VIT-T-8"


def test_state_dict_keys_are_openai_keys(small_pair):
    ours, reference = small_pair
    assert list(ours.state_dict()) == list(ours.state_dict())  # deterministic order
    assert set(ours.state_dict()) == set(reference.state_dict()) - {
        k for k in reference.state_dict() if k.endswith("attn_mask")}
    assert not any(k.startswith("text.") for k in ours.state_dict())


def test_parity_with_openai_reference_including_trimming(small_pair):
    ours, reference = small_pair
    pixels = torch.randn(4, 3, 32, 32)
    tokens = random_tokens(6, SMALL.text.vocab_size, seed=1)
    with torch.no_grad():
        assert (ours.encode_image(pixels) - reference.encode_image(pixels)).abs().max() < TOL
        assert (ours.encode_text(tokens) - reference.encode_text(tokens)).abs().max() < TOL
        # A full-length caption exercises the untrimmed path too.
        long = random_tokens(2, SMALL.text.vocab_size, seed=2, max_len=76)
        long[0, 1:76], long[0, 76] = 5, SMALL.text.vocab_size - 1
        assert (ours.encode_text(long) - reference.encode_text(long)).abs().max() < TOL
        image_features, text_features, scale = ours(pixels, tokens)
        logits, _ = reference(pixels, tokens)
        assert (scale * image_features @ text_features.t() - logits).abs().max() < 1e-4


def test_text_features_do_not_depend_on_batch_companions(small_pair):
    ours, _ = small_pair
    tokens = random_tokens(5, SMALL.text.vocab_size, seed=3)
    with torch.no_grad():
        batch = ours.encode_text(tokens)
        alone = torch.cat([ours.encode_text(tokens[i:i + 1]) for i in range(5)])
    assert (batch - alone).abs().max() < TOL


def _mlp_inputs(towers: dict, run) -> dict:
    """{(tower name, "last" / "before"): the shape its last / second-to-last block's MLP got} while `run()` runs."""
    seen, hooks = {}, []

    def record(key):
        def hook(module, args, out):
            seen[key] = tuple(args[0].shape)
        return hook

    for name, tower in towers.items():
        for depth, block in (("last", tower.transformer.resblocks[-1]), ("before", tower.transformer.resblocks[-2])):
            hooks.append(block.mlp.register_forward_hook(record((name, depth))))
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_the_last_block_computes_the_pooled_rows_alone(small_pair):
    # Only the class token's and each caption's pooled token's states reach the features, so the last block's MLP
    # runs on N rows; the block before it on every token (parity with the reference: the test above).
    ours, _ = small_pair
    tokens = random_tokens(6, SMALL.text.vocab_size, seed=1)
    seen = _mlp_inputs({"image": ours.visual, "text": ours.text},
                       lambda: (ours.encode_image(torch.randn(4, 3, 32, 32)), ours.encode_text(tokens)))
    width = SMALL.vision.width
    assert seen[("image", "last")] == (4, width) and seen[("image", "before")] == (4, 17, width)
    real = int((tokens.argmax(dim=1) + 1).sum())  # each caption's tokens up to its EOT, packed
    assert seen[("text", "last")] == (6, SMALL.text.width) and seen[("text", "before")] == (real, SMALL.text.width)


def test_the_padded_and_siglip_text_paths_pool_in_the_last_block_too(small_pair):
    # forward_padded (what the ONNX export traces) and SigLIP's bidirectional tower, each within 1e-5 of the whole
    # last block's output at the pooled positions.
    from nets.text_siglip import SiglipTextTower
    from nets.transformer import Pooled

    ours, _ = small_pair
    tokens = random_tokens(6, SMALL.text.vocab_size, seed=1)
    siglip = SiglipTextTower(TextConfig(kind="siglip", context_length=16, vocab_size=50, width=32, layers=2, heads=2),
                             24).eval()
    ids = torch.randint(1, 50, (3, 16))
    seen = _mlp_inputs({"text": ours.text, "siglip": siglip},
                       lambda: (ours.text.forward_padded(tokens), siglip(ids)))
    assert seen[("text", "last")] == (6, SMALL.text.width) and seen[("text", "before")] == (6, 77, SMALL.text.width)
    assert seen[("siglip", "last")] == (3, 32) and seen[("siglip", "before")] == (3, 16, 32)
    for tower, given, pooled in ((ours.text, tokens, tokens.argmax(dim=1)), (siglip, ids, torch.full((3,), 15))):
        x = tower.token_embedding(given) + tower.positional_embedding[:given.shape[1]]
        with torch.no_grad():
            whole = tower.transformer(x)[torch.arange(len(given)), pooled]
            causal = tower.transformer.causal
            keys = (torch.arange(given.shape[1]) <= pooled[:, None])[:, None, None] if causal else None
            alone = tower.transformer(x, pooled=Pooled(pooled, mask=keys))
        assert (whole - alone).abs().max() < 1e-5


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("tower", ["text", "image"])
def test_gradients_match_the_reference(small_pair, checkpointing, tower):
    # Packing drops every position after each row's EOT, and the last block computes the pooled rows alone;
    # training must see the same gradients as the reference's full positions, with and without checkpointing.
    ours, reference = small_pair
    ours.set_grad_checkpointing(checkpointing)
    given = random_tokens(6, SMALL.text.vocab_size, seed=5) if tower == "text" else torch.randn(6, 3, 32, 32)
    weights = torch.randn(6, SMALL.embed_dim)
    for model in (ours, reference):
        model.zero_grad()
        encode = model.encode_text if tower == "text" else model.encode_image
        (encode(given) * weights).sum().backward()
    grads = dict(reference.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        if p.grad is not None:
            assert (p.grad - grads[name.removeprefix("text.")].grad).abs().max() < TOL, name
            checked += 1
    assert checked > 10
    ours.set_grad_checkpointing(False)


def _hf_clip(config, state_dict):
    hf = transformers.CLIPModel(transformers_config(config)).eval()
    missing, unexpected = hf.load_state_dict(openai_to_transformers(state_dict), strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    return hf


@pytest.mark.slow
@pytest.mark.parametrize("which", ["small", "openai/VIT-B-32"])
def test_parity_with_transformers_clip(which):
    torch.manual_seed(0)
    config = SMALL if which == "small" else get_config(which)
    ours = build_model(config).eval()
    for p in ours.parameters():  # biases and gains away from their 0/1 init
        if p.dim() == 1:
            nn.init.normal_(p, mean=float(p.detach().mean()), std=0.05)
    hf = _hf_clip(config, ours.state_dict())
    pixels = torch.randn(2, 3, config.vision.image_size, config.vision.image_size)
    tokens = random_tokens(3, config.text.vocab_size, seed=4)
    with torch.no_grad():
        assert (ours.encode_image(pixels) - hf.get_image_features(pixel_values=pixels).pooler_output).abs().max() < TOL
        assert (ours.encode_text(tokens) - hf.get_text_features(input_ids=tokens).pooler_output).abs().max() < TOL


def bert_tokens(n: int, context_length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, context_length, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(1, context_length - 2, (1,), generator=g))
        tokens[i, 0], tokens[i, length + 1] = 101, 102
        tokens[i, 1:length + 1] = torch.randint(670, 8000, (length,), generator=g)
    return tokens


def test_parity_with_transformers_chinese_clip():
    torch.manual_seed(0)
    config = bert_config("bert-cls", 52)
    ours = build_model(config).eval()
    for p in ours.visual.parameters():
        if p.dim() == 1:
            nn.init.normal_(p, mean=float(p.detach().mean()), std=0.05)
    v = config.vision
    hf = transformers.ChineseCLIPModel(transformers_config(config)).eval()
    missing, unexpected = hf.load_state_dict(openai_to_transformers(ours.state_dict()), strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    pixels = torch.randn(2, 3, v.image_size, v.image_size)
    tokens = bert_tokens(4, 52)
    with torch.no_grad():
        hf_text = hf.get_text_features(input_ids=tokens, attention_mask=(tokens != 0).long(),
                                       token_type_ids=torch.zeros_like(tokens)).pooler_output
        assert (ours.encode_image(pixels) - hf.get_image_features(pixel_values=pixels).pooler_output).abs().max() < TOL
        assert (ours.encode_text(tokens) - hf_text).abs().max() < TOL


def test_self_cn_is_bert_pooler_then_layernorm_then_projection():
    torch.manual_seed(0)
    config = bert_config("bert-pooler", 77)
    ours = build_model(config).eval()
    nn.init.normal_(ours.text.ln_final.weight, 1.0, 0.1)
    nn.init.normal_(ours.text.ln_final.bias, 0.0, 0.1)
    sd = ours.state_dict()
    bert = transformers.BertModel(to_bert_config(config.text)).eval()
    bert.load_state_dict({k.removeprefix("transformer."): v for k, v in sd.items() if k.startswith("transformer.")})
    tokens = bert_tokens(4, 77, seed=1)
    with torch.no_grad():
        pooled = bert(input_ids=tokens, attention_mask=(tokens != 0).long()).pooler_output
        by_hand = nn.functional.layer_norm(pooled, (config.text.width,), sd["ln_final.weight"], sd["ln_final.bias"])
        assert (ours.encode_text(tokens) - by_hand @ sd["text_projection"]).abs().max() < TOL


@traces_on_purpose
def test_reference_matches_torchscript_trace_used_by_weight_tests():
    # Guards the TorchScript round trip: tracing must not change the reference's numbers.
    torch.manual_seed(0)
    reference = reference_for(SMALL)
    pixels, tokens = torch.randn(1, 3, 32, 32), random_tokens(2, SMALL.text.vocab_size)
    traced = torch.jit.trace(reference, (pixels, tokens), check_trace=False)
    with torch.no_grad():
        assert torch.equal(traced(pixels, tokens)[0], reference(pixels, tokens)[0])


def test_bert_activation_checkpointing_switches_without_deprecation_warnings():
    import warnings

    model = build_model(get_config("tiny-cn/VIT-T-8"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers 5 deprecates gradient_checkpointing_* (FutureWarning)
        for enable in (True, False, True):
            model.set_grad_checkpointing(enable)
            assert model.text.transformer.is_activation_checkpointing is enable
