"""Fine-tuning recipes: contrastive-exact accumulation, partial locking, LoRA (merged == adapter) and WiSE-FT in train.py."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from utils.data.toy import make_toy_dataset
from nets import build_model, get_config
from tests.conftest import SMALL, bert_config, random_tokens
from tests.test_training import train, train_args
from utils.finetune.accum import CachedBatch
from utils.finetune.lora import add_lora, plain_state_dict
from utils.finetune.partial import apply_locks, text_groups, vision_groups
from utils.finetune.wise_ft import interpolate
from utils.train.checkpoint import load_state, newest_state
from utils.train.distributed import DistInfo
from utils.train.loss import ClipLoss, SigLipLoss

FP32 = torch.float32
CPU = torch.device("cpu")


def _batch(config, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, config.vision.image_size, config.vision.image_size, generator=g)
    if config.text.is_bert:
        tokens = torch.randint(1, 1000, (n, 12), generator=g)
        tokens[:, 0] = 101
        tokens[n // 2:, 8:] = 0  # padded rows
    else:
        tokens = random_tokens(n, config.text.vocab_size, seed=seed)
    return pixels, tokens


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _direct_grads(model, pixels, tokens, criterion=ClipLoss()):
    model.zero_grad(set_to_none=True)
    criterion(*model(pixels, tokens)).backward()
    return _grads(model)


def _accumulated_grads(model, pixels, tokens, k, criterion=ClipLoss()):
    model.zero_grad(set_to_none=True)
    batch = CachedBatch(model, criterion, pixels, tokens, k, CPU, FP32)
    batch.backward(lambda loss: loss.backward())
    return batch.loss, _grads(model)


def _assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("config", [SMALL, bert_config("bert-pooler", 52)], ids=["openai", "bert"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad_checkpointing"])
def test_accumulation_gradients_equal_one_batch_within_1e_5(config, checkpointing):
    """Dropout off, fp32: k micro-batches over cached features give batch B's gradient, logit_scale's included."""
    torch.manual_seed(0)
    model = build_model(config).eval()  # eval: BERT's dropout off
    model.set_grad_checkpointing(checkpointing)
    pixels, tokens = _batch(config, 8)
    direct = _direct_grads(model, pixels, tokens)
    assert "logit_scale" in direct
    for k in ((4,) if checkpointing else (2, 8)):
        loss, accumulated = _accumulated_grads(model, pixels, tokens, k)
        _assert_close(accumulated, direct)
        torch.testing.assert_close(loss, ClipLoss()(*model(pixels, tokens)).detach(), atol=1e-6, rtol=1e-6)
    if checkpointing or config.text.is_bert:
        return
    # Summing independent micro-batch losses (each seeing B/k negatives) is a different gradient: the test can tell.
    model.zero_grad(set_to_none=True)
    for p, t in zip(pixels.chunk(4), tokens.chunk(4)):
        (ClipLoss()(*model(p, t)) / 4).backward()
    naive = _grads(model)
    assert max((naive[n] - direct[n]).abs().max() for n in direct) > 1e-3


# The 2-process checks, one per loss: SMALL with CLIP's softmax, and SMALL with a bias moved off its start (so a wrong
# sign or a missing bias shows) with SigLIP's sigmoid, whose per-rank loss is also checked against open_clip's.
_DDP_CASES = {"softmax": (SMALL, ClipLoss), "sigmoid": (replace(SMALL, init_logit_bias=-3.0), SigLipLoss)}


def _ddp_worker(rank: int, world: int, init_file: str, out: str, loss_name: str, state: dict, pixels, tokens) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        config, criterion = _DDP_CASES[loss_name]
        model = build_model(config)
        model.load_state_dict(state)
        info = DistInfo(rank=rank, local_rank=rank, world_size=world)
        share = len(pixels) // world
        mine = slice(rank * share, (rank + 1) * share)
        results = {}
        if loss_name == "sigmoid":  # this rank's loss, ours and open_clip's (which passes captions round the ranks)
            from open_clip.loss import SigLipLoss as OpenClipSigLipLoss

            with torch.no_grad():
                outputs = model(pixels[mine], tokens[mine])
                results["own"] = SigLipLoss(info)(*outputs)
                results["open_clip"] = OpenClipSigLipLoss(rank=rank, world_size=world)(*outputs)
        model.set_grad_checkpointing(rank == 0)  # one rank recomputing, one not: both must give the same
        ddp = DistributedDataParallel(model)
        for k in (1, 2):  # the whole local batch, and 2 micro-batches of it
            model.zero_grad(set_to_none=True)
            batch = CachedBatch(ddp, criterion(info), pixels[mine], tokens[mine], k, CPU, FP32)
            batch.backward(lambda loss: loss.backward())
            whole = batch.loss.clone()
            dist.all_reduce(whole)  # each rank's loss covers its rows; the batch's loss is their mean
            results[k] = {"loss": whole / world, "grads": _grads(model)}
        if rank == 0:
            torch.save(results, out)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", list(_DDP_CASES))
def test_two_gloo_processes_with_accumulation_equal_one_batch_within_1e_5(tmp_path, loss_name):
    """2 processes x batch 4 (x 1 or 2 micro-batches) == one process with batch 8 (DDP averages, the loss spans both
    ranks), for either loss; with sigmoid, each rank's loss is open_clip's SigLipLoss."""
    config, criterion = _DDP_CASES[loss_name]
    torch.manual_seed(0)
    model = build_model(config)
    pixels, tokens = _batch(config, 8, seed=1)
    direct = _direct_grads(model, pixels, tokens, criterion())
    loss = criterion()(*model(pixels, tokens)).detach()
    out = tmp_path / "rank0.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out), loss_name, model.state_dict(), pixels, tokens),
             nprocs=2, join=True)
    result = torch.load(out, weights_only=True)
    for k in (1, 2):
        _assert_close(result[k]["grads"], direct)
        torch.testing.assert_close(result[k]["loss"], loss, atol=1e-6, rtol=1e-6)
    if loss_name == "sigmoid":
        torch.testing.assert_close(result["own"], result["open_clip"], atol=1e-6, rtol=1e-6)


def test_partial_locks_unlock_the_last_groups():
    model = build_model(get_config("tiny/VIT-T-8"))
    cfg = dict(lock_image=True, lock_image_unlocked_groups=2, lock_text=True, lock_text_unlocked_layers=0,
               lock_layer_norm=True)
    apply_locks(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    last = len(model.visual.transformer.resblocks) - 1
    assert trainable == {"logit_scale", "visual.proj", "visual.ln_post.weight", "visual.ln_post.bias",
                         *(f"visual.transformer.resblocks.{last}.{n}" for n, _ in
                           model.visual.transformer.resblocks[last].named_parameters())}
    # LayerNorm tuning: the locked groups' LayerNorms train, nothing else of them does.
    apply_locks(model, {**cfg, "lock_image_unlocked_groups": 0, "lock_layer_norm": False})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".ln" in n or n == "logit_scale" for n in trainable)
    assert "text.ln_final.weight" in trainable and "visual.ln_pre.bias" in trainable
    assert len(vision_groups(model.visual)) == len(model.visual.transformer.resblocks) + 2
    # BERT tower (self-cn's, with a pooler): the last layer, pooler and ln_final, then the projection.
    cn = build_model(bert_config("bert-pooler", 52))
    apply_locks(cn, dict(cfg, lock_image=False, lock_text_unlocked_layers=2))
    text_trainable = {n for n, p in cn.text.named_parameters() if p.requires_grad}
    last_layer = len(cn.text.transformer.encoder.layer) - 1
    assert "text_projection" in text_trainable and "transformer.pooler.dense.weight" in text_trainable
    assert all(n.startswith((f"transformer.encoder.layer.{last_layer}.", "transformer.pooler.", "ln_final.",
                             "text_projection")) for n in text_trainable)
    assert len(text_groups(cn.text)) == len(cn.text.transformer.encoder.layer) + 2


@pytest.mark.slow
@pytest.mark.parametrize("config", [SMALL, bert_config("bert-cls", 52), get_config("tiny/RN-T")],
                         ids=["openai", "bert", "resnet"])
def test_merged_lora_weights_give_the_adapter_models_features_within_1e_5(config):
    torch.manual_seed(0)
    model = build_model(config).eval()
    pixels, tokens = _batch(config, 5)
    with torch.no_grad():
        base = model.encode_image(pixels), model.encode_text(tokens)
    add_lora(model, dict(lock_image=False, lock_text=False, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                         lora_targets=["attn", "mlp"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "logit_scale" in trainable and all("lora_" in n for n in trainable if n != "logit_scale")
    if not config.text.is_bert:  # q, k, v live in one parameter: it has an adapter too
        assert any("attn.lora_A" in n for n in trainable)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # trained adapters: B is no longer zero
            torch.nn.init.normal_(p, std=0.05)
    merged = build_model(config).eval()
    merged.load_state_dict(plain_state_dict(model), strict=True)  # plain OpenAI keys, no adapter left
    with torch.no_grad():
        adapted = model.encode_image(pixels), model.encode_text(tokens)
        plain = merged.encode_image(pixels), merged.encode_text(tokens)
    for a, p, b in zip(adapted, plain, base):
        torch.testing.assert_close(p, a, atol=1e-5, rtol=0)
        assert (a - b).abs().max() > 1e-2  # the adapters changed the features, so the comparison means something


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    make_toy_dataset(root, n_train=16, n_val=8, seed=1)
    return root


def _train(toy: Path, save_dir: Path, capsys, **extra):
    return train(train_args(toy, save_dir, eval_flag="false", **extra), capsys)


def test_train_py_accum_freq_matches_the_whole_batch(toy, tmp_path, capsys):
    # SGD: weights move by the gradient itself. Adam would magnify float noise in gradients that are zero in
    # exact arithmetic (attention's key bias) to a full step of either sign.
    sgd = dict(stop_after_steps=2, optimizer_type="sgd", Init_lr=0.05)
    whole = _train(toy, tmp_path / "whole", capsys, **sgd)
    split = _train(toy, tmp_path / "split", capsys, accum_freq=4, **sgd)
    assert whole.returncode == split.returncode == 0, split.stderr
    assert "as 4 micro-batches of 2 per process" in split.stdout
    a, b = (load_state(newest_state(tmp_path / d))["model"] for d in ("whole", "split"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0, msg=key)
    bad = _train(toy, tmp_path / "bad", capsys, accum_freq=3)
    assert bad.returncode == 2 and "accum_freq 3 does not divide the batch of 8" in bad.stderr
    assert "choose one of 1, 2, 4, 8" in bad.stderr and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_train_py_lora_saves_merged_weights_and_the_adapter_and_resumes_exactly(toy, tmp_path, capsys):
    lora = dict(lora_r=4, lora_alpha=8, wise_ft_alpha=0.5)
    straight = _train(toy, tmp_path / "straight", capsys, **lora)
    assert straight.returncode == 0, straight.stderr
    assert "trainable parameters:" in straight.stdout and "LoRA r=4 on attn+mlp" in straight.stdout
    run = tmp_path / "straight"
    weights = torch.load(run / "last_epoch_weights.pth", weights_only=True)
    assert not any("lora" in k or "base_layer" in k for k in weights)
    assert (run / "last_epoch_lora" / "adapter_model.safetensors").stat().st_size > 0
    assert (run / "last_epoch_lora" / "adapter_config.json").exists()
    # The merged file gives the features of the adapter model the training state holds.
    state = load_state(newest_state(run))
    adapted = build_model(get_config("tiny/VIT-T-8")).eval()
    add_lora(adapted, dict(lock_image=False, lock_text=False, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                           lora_targets=["attn", "mlp"]))
    adapted.load_state_dict(state["model"])
    merged = build_model(get_config("tiny/VIT-T-8")).eval()
    merged.load_state_dict(weights)
    pixels, tokens = _batch(get_config("tiny/VIT-T-8"), 4)
    with torch.no_grad():
        torch.testing.assert_close(merged.encode_image(pixels), adapted.encode_image(pixels), atol=1e-5, rtol=0)
        torch.testing.assert_close(merged.encode_text(tokens), adapted.encode_text(tokens), atol=1e-5, rtol=0)
    # WiSE-FT after the last epoch: the blend of the start (seeded random init) and the final merged weights.
    torch.manual_seed(3)
    start = build_model(get_config("tiny/VIT-T-8")).state_dict()
    blend = torch.load(run / "wise_ft_alpha0.5_weights.pth", weights_only=True)
    for key, value in interpolate(start, weights, 0.5).items():
        torch.testing.assert_close(blend[key], value, atol=0, rtol=0, msg=key)
    # Stop mid-run, resume: the same final weights as the uninterrupted run.
    first = _train(toy, tmp_path / "resumed", capsys, stop_after_steps=3, **lora)
    assert first.returncode == 0 and "stopped (stop_after_steps=3)" in first.stdout, first.stderr
    second = _train(toy, tmp_path / "resumed", capsys, resume="auto", **lora)
    assert second.returncode == 0, second.stderr
    resumed = torch.load(tmp_path / "resumed" / "last_epoch_weights.pth", weights_only=True)
    for key in weights:
        torch.testing.assert_close(resumed[key], weights[key], atol=1e-6, rtol=0, msg=key)


def test_lora_and_lock_mistakes_are_one_line(toy, tmp_path, capsys):
    result = _train(toy, tmp_path / "a", capsys, lora_r=4, lora_targets="qkv")
    assert result.returncode == 2 and "lora_targets 'qkv' match no layer" in result.stderr
    assert "c_fc" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = _train(toy, tmp_path / "b", capsys, lora_r=4, lock_image="true", lock_text="true")
    assert result.returncode == 2 and "leaves no tower for the adapters" in result.stderr
    result = _train(toy, tmp_path / "c", capsys, wise_ft_alpha=1.5)
    assert result.returncode == 2 and "--wise_ft_alpha must be a number from 0 to 1" in result.stderr
