"""CUDA: device parity, fp16/bf16 inference and AMP training through train.py. Skipped without a GPU."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clip import CLIP
from nets import build_model, get_config
from tests.conftest import SMALL, random_tokens
from tests.test_training import run_train, step_losses, toy, train_args  # noqa: F401  (toy is a fixture)
from utils.train.checkpoint import load_state, newest_state

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_fp32_matches_the_cpu_reference(small_pair):
    ours, reference = small_pair
    pixels = torch.randn(4, 3, 32, 32)
    tokens = random_tokens(6, SMALL.text.vocab_size, seed=1)
    cuda = ours.cuda()
    # TF32 would round the patch convolution to 10 mantissa bits; parity is about the math, not the format.
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        assert (cuda.encode_image(pixels.cuda()).cpu() - reference.encode_image(pixels)).abs().max() < 1e-5
        assert (cuda.encode_text(tokens.cuda()).cpu() - reference.encode_text(tokens)).abs().max() < 1e-5


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_inference_is_close_to_fp32(tiny_weights, precision):
    pixels = torch.randn(8, 3, 64, 64)
    texts = ["a red circle", "two blue squares above a green triangle", ""]
    fp32 = CLIP(model_path=str(tiny_weights), phi="tiny/VIT-T-8", cuda=True, precision="fp32")
    half = CLIP(model_path=str(tiny_weights), phi="tiny/VIT-T-8", cuda=True, precision=precision)
    assert half.device.type == "cuda"
    for a, b in zip(fp32.detect_image_for_eval(pixels, texts), half.detect_image_for_eval(pixels, texts)):
        assert b.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        assert F.cosine_similarity(a.float(), b.float()).min() > 0.999


def test_amp_training_follows_fp32_and_resumes_with_its_scaler(toy, tmp_path):  # noqa: F811
    losses = {}
    for precision in ("fp32", "fp16", "bf16"):
        result = run_train(train_args(toy, tmp_path / precision, Cuda="true", precision=precision, Epoch=1,
                                      datasets_random="false"))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "device=cuda" in result.stdout and f"precision={precision}" in result.stdout
        losses[precision] = step_losses(tmp_path / precision)
        weights = torch.load(tmp_path / precision / "last_epoch_weights.pth", weights_only=True)
        assert all(torch.isfinite(w).all() for w in weights.values())
    assert all(math.isfinite(x) for run in losses.values() for x in run)
    # Same data and initial weights: the first step's loss differs by rounding only.
    for precision in ("fp16", "bf16"):
        assert losses[precision][0] == pytest.approx(losses["fp32"][0], abs=0.05), losses
    state = load_state(newest_state(tmp_path / "fp16"))
    assert state["scaler"] and state["scaler"]["scale"] > 0

    first = run_train(train_args(toy, tmp_path / "resumed", Cuda="true", precision="fp16", Epoch=1,
                                 datasets_random="false", stop_after_steps=2))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train(train_args(toy, tmp_path / "resumed", Cuda="true", precision="fp16", Epoch=1,
                                  datasets_random="false", resume="auto"))
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-3000:]
    # GPU kernels may reduce in a different order from run to run, so equal within rounding, not bitwise.
    assert step_losses(tmp_path / "resumed") == pytest.approx(losses["fp16"], abs=1e-3)


def test_training_state_of_a_cuda_run_loads_on_the_cpu(toy, tmp_path):  # noqa: F811
    result = run_train(train_args(toy, tmp_path, Cuda="true", precision="bf16", Epoch=1, eval_flag="false"))
    assert result.returncode == 0, result.stderr[-3000:]
    model = build_model(get_config("tiny/VIT-T-8"))
    model.load_state_dict(torch.load(tmp_path / "last_epoch_weights.pth", map_location="cpu", weights_only=True))
    state = load_state(newest_state(tmp_path))
    assert state["config"]["phi"] == "tiny/VIT-T-8"


def test_cuda_accumulation_gradients_equal_one_batch():
    """accum_freq on the GPU in fp32 (TF32 off): the whole batch's gradient within 1e-5."""
    from utils.finetune.accum import CachedBatch
    from utils.train.loss import ClipLoss

    torch.manual_seed(0)
    model = build_model(SMALL).cuda()
    model.set_grad_checkpointing(True)
    pixels, tokens = torch.randn(8, 3, 32, 32).cuda(), random_tokens(8, SMALL.text.vocab_size, seed=2).cuda()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        ClipLoss()(*model(pixels, tokens)).backward()
        direct = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        CachedBatch(model, ClipLoss(), pixels, tokens, 4, pixels.device, torch.float32).backward(
            lambda loss: loss.backward())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, direct[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_amp_training_with_accumulation_and_lora(toy, tmp_path, precision):  # noqa: F811
    result = run_train(train_args(toy, tmp_path, Cuda="true", precision=precision, Epoch=1, eval_flag="false",
                                  accum_freq=4, lora_r=4, grad_checkpointing="true"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "as 4 micro-batches" in result.stdout and "LoRA r=4" in result.stdout
    assert all(math.isfinite(x) for x in step_losses(tmp_path))
    weights = torch.load(tmp_path / "last_epoch_weights.pth", map_location="cpu", weights_only=True)
    build_model(get_config("tiny/VIT-T-8")).load_state_dict(weights)  # merged, plain keys



def test_coca_caption_steps_on_cuda_give_the_whole_prefixs_logits():
    # The key-value cache (nets/coca.py CaptionSteps) on the GPU: fp32 within 1e-4 of the whole prefix's logits
    # (TF32 off: parity is about the math), and in fp16 a caption of valid tokens through generate.
    from tests.test_coca import EOT, SOT, images, ours_of, reference
    from utils.predict.generate import Generation, generate

    net = ours_of(reference()).cuda()
    pixels = images(2).cuda()
    tokens = torch.randint(1, SOT, (2, 8), generator=torch.Generator().manual_seed(0)).cuda()
    tokens[:, 0], tokens[1, 5:] = SOT, 0
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            image_tokens = net.visual.forward_with_tokens(pixels)[1]
            steps = net.caption_steps(image_tokens)
            worst = max((steps.next(tokens[:, p:p + 1]) - net.caption_logits(image_tokens, tokens[:, :p + 1])[:, -1])
                        .abs().max().item() for p in range(tokens.shape[1]))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert worst < 1e-4, worst
    half = generate(net.half(), pixels.half(), SOT, EOT, Generation(seq_len=12, min_seq_len=3))
    assert half.shape[0] == 2 and (half[:, 0] == SOT).all() and int(half.max()) < net.config.text.vocab_size
