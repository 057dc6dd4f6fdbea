"""Training a CoCa as open_clip does: the loss (contrastive + caption cross-entropy, open_clip's CoCaLoss weights)
against open_clip's CoCaLoss on open_clip's CoCa with the same weights, its gradients in the decoder, micro-batches
that add up to the whole batch, and train.py lowering the caption loss of a tiny CoCa on the toy set (with an
exact resume)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_script, small_coca
from tests.test_coca import captions_tokens, images, ours_of, reference
from utils.finetune.accum import CachedBatch
from utils.train.caption_loss import CoCaLoss, batch_losses
from utils.train.loss import ClipLoss

open_clip = pytest.importorskip("open_clip")

TOL = 1e-5
DECODER_PARAMETERS = ("text_decoder.text_projection", "text_decoder.resblocks.0.attn.in_proj_weight",
                      "text_decoder.cross_attn.1.attn.in_proj_weight", "text_decoder.cross_attn.0.mlp.c_fc.weight",
                      "text_decoder.ln_final.weight", "text.cls_emb", "visual.attn_pool.query")


def _batch():
    return images(4), captions_tokens(4)


def _open_clips_loss(ref, pixels, tokens, caption_weight=2.0, clip_weight=1.0):
    from open_clip.loss import CoCaLoss as OpenClipCoCaLoss

    terms = OpenClipCoCaLoss(caption_loss_weight=caption_weight, clip_loss_weight=clip_weight)(
        **ref(pixels, tokens), output_dict=True)
    return terms


def _grads(model, names):
    params = dict(model.named_parameters())
    return {n: params[n].grad.clone() for n in names}


@pytest.mark.parametrize("weights", [(2.0, 1.0), (1.0, 0.0)], ids=["open_clip-defaults", "caption-only"])
def test_loss_and_decoder_gradients_within_1e_5_of_open_clips_coca_loss(weights):
    ref = reference().train()
    ours = ours_of(ref).train()
    pixels, tokens = _batch()
    theirs = _open_clips_loss(ref, pixels, tokens, *weights)
    sum(theirs.values()).backward()
    loss, parts = batch_losses(ours, CoCaLoss(ClipLoss(), *weights), pixels, tokens)
    loss.backward()
    diffs = {name: abs(parts[name].item() - theirs[name].item()) for name in ("contrastive_loss", "caption_loss")}
    grads = {n: (a - b).abs().max().item() for (n, a), b in zip(_grads(ours, DECODER_PARAMETERS).items(),
                                                                 _grads(ref, DECODER_PARAMETERS).values())}
    print(f"\nCoCa loss {weights}: {loss.item():.4f}, term diffs {diffs}, max grad diff {max(grads.values()):.2e}")
    assert parts["caption_loss"].item() > 1.0  # a real cross-entropy, not a term that is always 0
    assert all(d < TOL for d in diffs.values()) and abs(loss.item() - sum(theirs.values()).item()) < TOL
    assert all(d < TOL for d in grads.values()), grads
    assert ours.text_decoder.text_projection.grad.abs().max() > 1e-3


def test_trimmed_padding_gives_the_same_loss():
    """The loader may trim padding: the caption loss ignores it, and the features are read at the full context."""
    ours = ours_of(reference())
    pixels, tokens = images(3), captions_tokens()[[0, 1, 3]]  # captions of 3, 7 and 5 tokens
    criterion = CoCaLoss(ClipLoss())
    with torch.no_grad():
        full = batch_losses(ours, criterion, pixels, tokens)[1]
        trimmed = batch_losses(ours, criterion, pixels, tokens[:, :8])[1]
    assert all(abs(float(full[k]) - float(trimmed[k])) < TOL for k in full)


def test_micro_batches_give_the_whole_batchs_loss_and_gradients():
    ours = ours_of(reference()).train()
    pixels, tokens = _batch()
    criterion = CoCaLoss(ClipLoss())
    loss, parts = batch_losses(ours, criterion, pixels, tokens)
    loss.backward()
    whole = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad(set_to_none=True)
    batch = CachedBatch(ours, criterion, pixels, tokens, 2, torch.device("cpu"), torch.float32)
    batch.backward(lambda micro_loss: micro_loss.backward())
    assert abs(batch.loss.item() - loss.item()) < TOL
    assert all(abs(batch.parts[k].item() - parts[k].item()) < TOL for k in parts)
    worst = max((p.grad - whole[n]).abs().max().item() for n, p in ours.named_parameters())
    assert worst < TOL, worst


def test_a_model_without_a_decoder_refuses_captions():
    from nets import build_model, get_config

    with pytest.raises(ValueError, match="caption decoder"):
        build_model(get_config("tiny/VIT-T-8"))(torch.zeros(1, 3, 64, 64), torch.zeros(1, 77, dtype=torch.long),
                                                captions=True)


# train.py on the toy set: a tiny CoCa with OpenAI's vocabulary (its BPE tokenizer reads the toy captions).
TRAIN_COCA = small_coca(layers=1, context_length=20, vocab_size=49408)


@pytest.fixture(scope="module")
def coca_run(tmp_path_factory):
    """(toy set, starting folder, the uninterrupted run's save_dir): 2 epochs of 3 steps from random weights."""
    from safetensors.torch import save_file

    from nets import build_model
    from nets.open_clip_configs import from_open_clip
    from utils.data.toy import make_toy_dataset

    toy = tmp_path_factory.mktemp("toy")
    make_toy_dataset(toy, n_train=24, n_val=8, seed=1, size=32)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("coca")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TRAIN_COCA}))
    save_file({k: v.contiguous() for k, v in build_model(from_open_clip(TRAIN_COCA)).state_dict().items()},
              folder / "open_clip_model.safetensors")
    save_dir = tmp_path_factory.mktemp("straight")
    result = _train(toy, folder, save_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return toy, folder, save_dir, result


def _train(toy, folder, save_dir, *extra):
    args = dict(model_path=folder, phi="auto", datasets_path=toy, datasets_train_json_path=toy / "en_train.json",
                datasets_val_json_path=toy / "en_val.json", batch_size=8, Epoch=2, Init_lr=1e-3, scale_lr="false",
                warmup_ratio=0, num_workers=0, save_dir=save_dir, eval_flag="false", seed=3, Cuda="false")
    return run_script("train.py", *[x for k, v in args.items() for x in (f"--{k}", str(v))], *extra, threads=1)


def _steps(save_dir):
    lines = [json.loads(x) for log in sorted(save_dir.glob("loss_*/steps.jsonl")) for x in log.read_text().splitlines()]
    return sorted(lines, key=lambda r: r["global_step"])


def test_train_py_lowers_a_cocas_caption_loss_and_trains_its_decoder(coca_run):
    from safetensors.torch import load_file

    toy, folder, save_dir, result = coca_run
    assert "CoCa: loss = 1 x softmax + 2 x caption cross-entropy" in result.stdout
    steps = _steps(save_dir)
    assert len(steps) == 6 and all({"contrastive_loss", "caption_loss"} <= set(s) for s in steps)
    assert all(abs(s["loss"] - s["contrastive_loss"] - s["caption_loss"]) < 1e-4 for s in steps)
    caption = [s["caption_loss"] for s in steps]
    print(f"\ncaption loss by step: {', '.join(f'{c:.3f}' for c in caption)}")
    assert caption[-1] < caption[0] - 1.0, caption
    history = [json.loads(x) for x in next(save_dir.glob("loss_*/history.jsonl")).read_text().splitlines()]
    assert "caption_loss" in history[-1] and "= contrastive_loss" in result.stdout
    start = load_file(folder / "open_clip_model.safetensors")
    trained = torch.load(save_dir / "last_epoch_weights.pth", weights_only=True)
    decoder = [k for k in start if k.startswith("text_decoder.")]
    assert decoder and all(not torch.equal(start[k], trained[k]) for k in decoder if not k.endswith("bias"))


def test_a_cocas_resume_mid_epoch_ends_with_the_same_weights(coca_run, tmp_path):
    toy, folder, straight_dir, _ = coca_run
    first = _train(toy, folder, tmp_path, "--stop_after_steps", "2")
    assert first.returncode == 0 and "--resume" in first.stdout, first.stderr[-3000:]
    second = _train(toy, folder, tmp_path, "--resume", "auto")
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-3000:]
    a = torch.load(straight_dir / "last_epoch_weights.pth", weights_only=True)
    b = torch.load(tmp_path / "last_epoch_weights.pth", weights_only=True)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert [s["caption_loss"] for s in _steps(straight_dir)] == \
        pytest.approx([s["caption_loss"] for s in _steps(tmp_path)], abs=1e-6)


def test_locks_freeze_each_whole_tower_and_leave_the_decoder_training():
    """CoCa's pooler and class embedding are in their towers' groups (they were in none, so a lock missed them)."""
    from utils.finetune.partial import apply_locks, text_groups, vision_groups

    model = ours_of(reference())
    for tower, groups in ((model.visual, vision_groups(model.visual)), (model.text, text_groups(model.text))):
        ids = [id(p) for group in groups for item in group
               for p in (item.parameters() if isinstance(item, torch.nn.Module) else [item])]
        assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in tower.parameters()}
    apply_locks(model, dict(lock_image=True, lock_image_unlocked_groups=0, lock_text=True,
                            lock_text_unlocked_layers=0, lock_layer_norm=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("text_decoder.")} | {"logit_scale"}


def test_lora_adapts_the_decoder_too_and_merges_exactly():
    from nets import build_model
    from utils.finetune.lora import add_lora, merged_copy

    model = ours_of(reference())
    add_lora(model, dict(lock_image=False, lock_text=False, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                         lora_targets=["attn", "mlp"]))
    adapted = {n.split(".")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"visual", "text", "text_decoder"}
    assert not [n for n, _ in model.named_parameters() if "out_proj.lora" in n and "attn_pool" in n]  # never called
    pixels, tokens = _batch()
    loss, _ = batch_losses(model, CoCaLoss(ClipLoss()), pixels, tokens)
    loss.backward()
    decoder_b = [p for n, p in model.named_parameters() if n.startswith("text_decoder.") and "lora_B" in n]
    assert decoder_b and all(p.grad is not None and p.grad.abs().max() > 0 for p in decoder_b)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        plain = build_model(model.config).eval()
        plain.load_state_dict(merged_copy(model).state_dict())
        model.eval()
        a = model(pixels, tokens, captions=True)[-1]
        b = plain(pixels, tokens, captions=True)[-1]
        unadapted = ours_of(reference())(pixels, tokens, captions=True)[-1]
    assert (a - b).abs().max() < 1e-4 and (a - unadapted).abs().max() > 1e-2
