"""SigLIP's sigmoid loss (train.py loss="sigmoid"): open_clip's SigLipLoss on the same features, exact with accum_freq
and across processes, the learned logit_bias through train.py (resume mid-epoch, locks, LoRA, WiSE-FT), scores."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from utils.data.toy import make_toy_dataset
from nets import build_model, get_config
from tests.conftest import SMALL, random_tokens
from tests.test_training import train, train_args
from utils.finetune.accum import CachedBatch
from utils.train.checkpoint import load_state, newest_state
from utils.train.loss import SIGMOID_INIT_BIAS, ClipLoss, SigLipLoss, add_logit_bias
from utils.weights.load import load_model

CPU, FP32 = torch.device("cpu"), torch.float32
# SMALL with a bias moved off its start, so that a wrong sign or a missing bias shows in every number.
BIASED = replace(SMALL, init_logit_bias=-3.0)


def _features(n: int, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images, texts = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    texts[: n // 2] += 2 * images[: n // 2]  # some pairs match, so positives and negatives both weigh
    return F.normalize(images, dim=-1), F.normalize(texts, dim=-1)


def _loss_and_grads(criterion, images, texts, scale, bias):
    leaves = [x.clone().requires_grad_(True) for x in (images, texts, scale, bias)]
    loss = criterion(leaves[0], leaves[1], leaves[2].exp(), leaves[3])
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("n", [1, 8, 33])
def test_sigmoid_loss_and_its_gradients_equal_open_clip_siglip_loss_within_1e_6(n):
    from open_clip.loss import SigLipLoss as OpenClipSigLipLoss

    images, texts = _features(n)
    scale, bias = torch.tensor(math.log(7.0)), torch.tensor(-4.5)
    ours = _loss_and_grads(SigLipLoss(), images, texts, scale, bias)
    theirs = _loss_and_grads(OpenClipSigLipLoss(), images, texts, scale, bias)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-6, rtol=1e-6)
    for name, a, b in zip(("images", "texts", "logit_scale", "logit_bias"), ours[1], theirs[1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    # The softmax loss is another function of the same features: the comparison can tell them apart.
    assert n == 1 or abs(ClipLoss()(images, texts, scale.exp()) - ours[0]) > 1e-2


def test_softmax_loss_ignores_the_bias_and_sigmoid_needs_one():
    images, texts = _features(6)
    scale = torch.tensor(20.0)
    assert torch.equal(ClipLoss()(images, texts, scale), ClipLoss()(images, texts, scale, torch.tensor(-10.0)))
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(images, texts, scale)


def _batch(config, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, config.vision.image_size, config.vision.image_size, generator=g),
            random_tokens(n, config.text.vocab_size, seed=seed))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _direct(model, pixels, tokens):
    model.zero_grad(set_to_none=True)
    loss = SigLipLoss()(*model(pixels, tokens))
    loss.backward()
    return loss.detach(), _grads(model)


def _assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_sigmoid_accumulation_gradients_equal_one_batch_within_1e_5():
    """k micro-batches over cached features give batch B's loss and gradient, logit_scale's and logit_bias's too."""
    torch.manual_seed(0)
    model = build_model(BIASED).eval()
    pixels, tokens = _batch(BIASED, 8)
    loss, direct = _direct(model, pixels, tokens)
    assert {"logit_scale", "logit_bias"} <= direct.keys()
    for k in (2, 8):
        model.zero_grad(set_to_none=True)
        batch = CachedBatch(model, SigLipLoss(), pixels, tokens, k, CPU, FP32)
        batch.backward(lambda micro_loss: micro_loss.backward())
        torch.testing.assert_close(batch.loss, loss, atol=1e-6, rtol=1e-6)
        _assert_close(_grads(model), direct)
    # Summing independent micro-batch losses (each seeing B/k negatives) is another gradient: the test can tell.
    model.zero_grad(set_to_none=True)
    for p, t in zip(pixels.chunk(4), tokens.chunk(4)):
        (SigLipLoss()(*model(p, t)) / 4).backward()
    naive = _grads(model)
    assert max((naive[n] - direct[n]).abs().max() for n in direct) > 1e-3


# The 2-process check (each rank's loss equal to open_clip's) is tests/test_finetune.py's, parametrised by loss.


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    make_toy_dataset(root, n_train=24, n_val=8, seed=1)
    return root


@pytest.fixture(scope="module")
def sigmoid_run(toy, tmp_path_factory):
    """3 epochs from scratch with loss=sigmoid, trained once: the resume test's uninterrupted reference too."""
    save_dir = tmp_path_factory.mktemp("sigmoid_run")
    return save_dir, train(train_args(toy, save_dir, Epoch=3, eval_flag="false", loss="sigmoid"))


@pytest.mark.slow
def test_train_sigmoid_from_scratch_learns_a_bias_that_every_loader_keeps(toy, tmp_path, capsys, sigmoid_run):
    run_dir, result = sigmoid_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loss=sigmoid" in result.stdout and "logit_bias: new" in result.stdout
    weights = torch.load(run_dir / "last_epoch_weights.pth", weights_only=True)
    assert "logit_bias" in weights and weights["logit_bias"].item() != SIGMOID_INIT_BIAS  # it trained
    # Strict loads: by the record beside the file, by the named phi, and by shapes alone.
    for phi in ("auto", "tiny/VIT-T-8"):
        model, _ = load_model(run_dir / "last_epoch_weights.pth", phi)
        assert model.logit_bias.item() == weights["logit_bias"].item()
    bare = tmp_path / "bare.pth"
    torch.save(weights, bare)
    assert load_model(bare, "auto")[0].logit_bias is not None
    assert load_state(newest_state(run_dir))["config"]["clip"]["init_logit_bias"] == SIGMOID_INIT_BIAS
    # The default loss of weights with a bias is the one they were trained with.
    again = train(train_args(toy, tmp_path / "again", model_path=run_dir / "last_epoch_weights.pth", Epoch=1,
                             eval_flag="false", stop_after_steps=1), capsys)
    assert again.returncode == 0 and "loss=sigmoid" in again.stdout and "logit_bias: new" not in again.stdout
    plain = train(train_args(toy, tmp_path / "plain", Epoch=1, eval_flag="false", stop_after_steps=1), capsys)
    assert "loss=softmax" in plain.stdout
    assert "logit_bias" not in load_state(newest_state(tmp_path / "plain"))["model"]


@pytest.mark.slow
def test_bad_loss_name_and_sigmoid_resume_of_a_softmax_state_are_one_line(toy, tmp_path, capsys):
    bad = train(train_args(toy, tmp_path / "bad", loss="hinge"), capsys)
    assert bad.returncode == 2 and "loss 'hinge' is not one of softmax, sigmoid" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()
    first = train(train_args(toy, tmp_path / "soft", eval_flag="false", stop_after_steps=1), capsys)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = train(train_args(toy, tmp_path / "soft", eval_flag="false", resume="auto", loss="sigmoid"), capsys)
    assert resumed.returncode == 2 and "trained with the softmax loss" in resumed.stderr, resumed.stderr[-2000:]


@pytest.mark.slow
def test_sigmoid_stopped_mid_epoch_then_resume_auto_ends_with_the_same_weights(toy, tmp_path, capsys, sigmoid_run):
    """The bias and its optimizer state resume exactly (test_reliability kills a run with SIGKILL; the resume it
    reads is this one)."""
    straight_dir, straight = sigmoid_run
    assert straight.returncode == 0, straight.stderr[-3000:]
    settings = dict(Epoch=3, eval_flag="false", loss="sigmoid")
    first = train(train_args(toy, tmp_path / "b", stop_after_steps=4, **settings), capsys)  # in epoch 2
    assert first.returncode == 0 and "--resume" in first.stdout, first.stderr[-3000:]
    resumed = train(train_args(toy, tmp_path / "b", resume="auto", **settings), capsys)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    a = torch.load(straight_dir / "last_epoch_weights.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "last_epoch_weights.pth", weights_only=True)
    assert "logit_bias" in a and a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.slow
def test_sigmoid_with_locks_lora_and_wise_ft_trains_and_blends_the_bias(toy, tmp_path, capsys, tiny_weights):
    """From weights without a bias: the image tower locked, LoRA on the text tower; logit_scale and logit_bias
    train, and the WiSE-FT blend mixes them with the start the run gave them (scale 10, bias -10)."""
    result = train(train_args(toy, tmp_path, model_path=tiny_weights, Epoch=1, eval_flag="false", loss="sigmoid",
                              lock_image="true", lora_r=2, wise_ft_alpha=0.5, Init_lr=1e-2), capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    start = torch.load(tiny_weights, weights_only=True)
    final = torch.load(tmp_path / "last_epoch_weights.pth", weights_only=True)
    blend = torch.load(tmp_path / "wise_ft_alpha0.5_weights.pth", weights_only=True)
    assert "logit_bias" not in start and final["logit_bias"].item() != SIGMOID_INIT_BIAS
    assert final["logit_scale"].item() != pytest.approx(math.log(10))
    assert all(torch.equal(start[k], final[k]) for k in start if k.startswith("visual."))  # locked
    assert any(not torch.equal(start[k], final[k]) for k in start if k.startswith("transformer."))  # LoRA merged
    for key, begin in (("logit_bias", SIGMOID_INIT_BIAS), ("logit_scale", math.log(10))):
        assert blend[key].item() == pytest.approx((begin + final[key].item()) / 2, abs=1e-6), key


@torch.no_grad()
def test_detect_image_of_a_model_with_a_bias_is_independent_sigmoids(tmp_path):
    from PIL import Image

    from clip import CLIP
    from utils.weights.arch import save_weights

    torch.manual_seed(0)
    net = build_model(get_config("tiny/VIT-T-8"))
    add_logit_bias(net)
    net.logit_bias.fill_(-1.5)
    net.logit_scale.fill_(math.log(20))
    save_weights(net.state_dict(), tmp_path / "w.pth", net.config, "tiny/VIT-T-8")
    model = CLIP(model_path=str(tmp_path / "w.pth"), phi="auto", cuda=False)
    image = Image.new("RGB", (80, 60), (120, 30, 200))
    texts = ["a purple square", "a dog", "a photo of nothing at all"]
    probs = model.detect_image(image, texts)
    image_features = F.normalize(net.encode_image(model.preprocess(image)), dim=-1)
    text_features = F.normalize(net.encode_text(model.tokenize(texts)), dim=-1)
    expected = torch.sigmoid(20 * image_features @ text_features.t() - 1.5)
    torch.testing.assert_close(torch.from_numpy(probs), expected, atol=1e-5, rtol=0)
    assert abs(probs.sum() - 1) > 1e-3  # not a softmax over the captions


def test_export_hf_refuses_a_model_with_a_bias_in_one_line():
    from utils.export.hf import refusal

    assert refusal(get_config("tiny/VIT-T-8")) is None or "logit_bias" not in refusal(get_config("tiny/VIT-T-8"))
    assert "logit_bias" in refusal(replace(get_config("openai/VIT-B-32"), init_logit_bias=-10.0))
