"""Every job with every family built today, each at a small random-weight size (issue 26, item 3): one training step
under each lock setting, the locks naming the tower's own groups (a timm trunk's blocks or stages by timm's
group_matcher) and BatchNorm statistics held; LoRA on each tower's attention (or one line saying a tower has none);
zero-shot and embed through the saved weights with phi='auto' within 1e-4 of the network that was saved; ONNX within
1e-4 of PyTorch (or one line saying what does not export); export_hf where transformers has the class (CLIPModel,
SiglipModel) within 1e-4, else one line."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from nets import build_model, get_config
from nets.configs import CLIPConfig, TextConfig, VisionConfig
from nets.open_clip_configs import from_open_clip
from utils.data.preprocess import OPENAI
from utils.errors import UserError
from utils.finetune.lora import add_lora, merged_copy
from utils.finetune.partial import apply_locks, freeze_batch_norm_stats, vision_groups, text_groups
from utils.weights.arch import save_weights

pytest.importorskip("timm")
pytest.importorskip("peft")

_BPE_TEXT = dict(kind="openai-custom", context_length=16, vocab_size=49408, width=32, layers=2, heads=2,
                 activation="gelu")
_SMALL_VIT = dict(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=2)


def _timm(trunk: str, kwargs: dict, pool: str, proj: str) -> CLIPConfig:
    """A family's timm trunk at a test size (the sizes in `kwargs` go to timm), open_clip's head, a small BPE tower."""
    return CLIPConfig(embed_dim=48,
                      vision=VisionConfig(kind="timm", timm_model_name=trunk, image_size=64, patch_size=16, width=48,
                                          layers=2, heads=2, activation="gelu", timm_pool=pool, timm_proj=proj,
                                          timm_kwargs=tuple(kwargs.items())),
                      text=TextConfig(**_BPE_TEXT))


def _siglip() -> CLIPConfig:
    from tests.test_siglip_jobs import TINY_SIGLIP

    return TINY_SIGLIP


def _clipa() -> CLIPConfig:
    from tests.test_clipa import SMALL

    return from_open_clip(SMALL)


# One small model per family (tests/test_zoo_timm.py's trunks, test_siglip_jobs' SigLIP, test_clipa's CLIPA).
FAMILIES = {
    "openai-vit": lambda: get_config("tiny/VIT-T-8"),
    "openai-resnet": lambda: get_config("tiny/RN-T"),
    "siglip": _siglip,
    "eva01": lambda: _timm("eva_giant_patch14_224", dict(_SMALL_VIT, mlp_ratio=3.5), "token", ""),
    "eva02": lambda: _timm("eva02_base_patch16_clip_224", _SMALL_VIT, "token", ""),
    "convnext": lambda: _timm("convnext_tiny", dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40)), "", "linear"),
    "vitamin": lambda: _timm("vitamin_small_224", dict(img_size=64, depth=1), "", "linear"),
    "pe-core": lambda: _timm("vit_pe_core_tiny_patch16_384", dict(img_size=64, depth=2), "map", ""),
    "mobileclip-vit": lambda: _timm("vit_base_mci_224", dict(img_size=64, depth=1), "token", ""),
    "clipa": _clipa,
}
NAMES = list(FAMILIES)


def _model(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(FAMILIES[family]())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the init (zero biases, identity layer scales), so that no tensor is special
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model


def _batch(config: CLIPConfig, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    size, context, vocab = config.vision.image_size, config.text.context_length, config.text.vocab_size
    pixels = torch.randn(n, 3, size, size, generator=g)
    tokens = torch.randint(1, vocab - 2, (n, context), generator=g)
    for row in range(n):  # BPE-like rows of several lengths: EOT the largest id, zeros after it
        end = 3 + 2 * row
        tokens[row, end], tokens[row, end + 1:] = vocab - 1, 0
    return pixels, tokens


# lock settings (train.py's names) -> what trains afterwards.
LOCKS = {
    "none": dict(lock_image=False, lock_text=False),
    "image": dict(lock_image=True, lock_image_unlocked_groups=0),
    "image-last-group": dict(lock_image=True, lock_image_unlocked_groups=1),
    "image-norms": dict(lock_image=True, lock_image_unlocked_groups=0, lock_layer_norm=False),
    "text-last-group": dict(lock_text=True, lock_text_unlocked_layers=1),
}
_LOCK_DEFAULTS = dict(lock_image=False, lock_image_unlocked_groups=0, lock_text=False, lock_text_unlocked_layers=0,
                      lock_layer_norm=True)


def _train_step(model: nn.Module, cfg: dict) -> None:
    """One step of utils/train/epoch.fit_one_epoch, train.py's loop, on one batch."""
    from utils.train.distributed import DistInfo
    from utils.train.epoch import StopFlag, fit_one_epoch
    from utils.train.loss import build_loss

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = dict(global_step=0, run_start_step=0, bad_steps=0, bad_in_a_row=0, step=0, epoch_loss_sum=0.0,
                 epoch_loss_count=0)
    settings = dict(stop_after_steps=0, Epoch=1, max_bad_steps=3, grad_clip=0.0, accum_freq=1, **cfg)
    loss = build_loss("sigmoid" if model.logit_bias is not None else "softmax")
    fit_one_epoch(model, loss, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                  [_batch(model.config)], 1, 0, state, settings, torch.device("cpu"), "fp32", DistInfo(), StopFlag(),
                  None)
    assert state["global_step"] == 1 and state["bad_steps"] == 0


def _ids(items) -> set[int]:
    return {id(p) for item in items for p in (item.parameters() if isinstance(item, nn.Module) else [item])}


def _norm_ids(tower: nn.Module) -> set[int]:
    norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)
    return {id(p) for m in tower.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}


@pytest.mark.parametrize("lock", list(LOCKS))
@pytest.mark.parametrize("family", NAMES)
def test_one_training_step_under_each_lock_trains_exactly_the_named_groups(family, lock):
    model = _model(family)
    cfg = {**_LOCK_DEFAULTS, **LOCKS[lock], "freeze_bn_stats": None, "model_path": "weights.pth"}
    apply_locks(model, cfg)
    vision, text = vision_groups(model.visual), text_groups(model.text)
    # The groups split each tower: every parameter in exactly one, and more groups than the ends alone.
    for tower, groups in ((model.visual, vision), (model.text, text)):
        ids = [i for group in groups for i in _ids(group)]
        assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in tower.parameters()}
        assert len(groups) >= 3  # the input side, the blocks or stages, the output side
    expected = {id(p) for p in model.parameters()}
    if cfg["lock_image"]:
        kept = _ids(vision[-1]) if cfg["lock_image_unlocked_groups"] else set()
        if not cfg["lock_layer_norm"]:
            kept |= _norm_ids(model.visual)
            assert kept, "a tower with no norm to train"
        expected -= {id(p) for p in model.visual.parameters()} - kept
    if cfg["lock_text"]:
        expected -= {id(p) for p in model.text.parameters()} - _ids(text[-1])
    assert {id(p) for p in model.parameters() if p.requires_grad} == expected
    before = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    _train_step(model, cfg)
    for name, buffer in model.named_buffers():  # BatchNorm statistics stay as loaded when training from weights
        assert torch.equal(buffer, before[name]), f"{name} changed: BatchNorm statistics must hold"
    names = {id(p): n for n, p in model.named_parameters()}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= {names[i] for i in expected}, changed - {names[i] for i in expected}
    # Every trainable group of each tower moved (a lock that froze too much would leave one still).
    for tower_name, groups in (("visual", vision), ("text", text)):
        for group in groups:
            trained = [names[i] for i in _ids(group) if i in expected]
            if trained:
                assert set(trained) & changed, f"{tower_name} group of {trained[:2]} did not train"


@pytest.mark.parametrize("family", ["openai-resnet", "mobileclip-vit"])
def test_batchnorm_statistics_hold_when_training_from_weights_and_move_from_scratch(family):
    """ResNet's BatchNorms and those of MobileCLIP's convolutional stem: one rule, utils/finetune/partial's."""
    for frozen in (True, False):
        model = _model(family)
        stats = {n: b.clone() for n, b in model.named_buffers() if "running_mean" in n}
        assert stats
        apply_locks(model, _LOCK_DEFAULTS)
        _train_step(model, {**_LOCK_DEFAULTS, "freeze_bn_stats": frozen, "model_path": "w.pth"})
        moved = [n for n, b in model.named_buffers() if n in stats and not torch.equal(b, stats[n])]
        assert (not moved) if frozen else len(moved) == len(stats), (frozen, moved)
    model = _model(family).train()
    assert freeze_batch_norm_stats(model, True) == len(stats)


@pytest.mark.parametrize("family", NAMES)
def test_lora_adapts_each_towers_attention_or_says_in_one_line_that_it_has_none(family):
    model = _model(family).eval()
    cfg = dict(lock_image=False, lock_text=False, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_targets=["attn"])
    if family == "convnext":
        with pytest.raises(UserError, match=r"image tower \(convnext_tiny\) has no attention layer") as err:
            add_lora(model, cfg)
        assert "\n" not in str(err.value)
        cfg["lora_targets"] = ["mlp"]  # its blocks' MLPs take adapters
    add_lora(model, cfg)
    adapted = {n.split(".")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"visual", "text"}
    if family != "convnext":  # in every attention block of the image tower: one adapter per q/k/v/out projection
        visual = [n for n, _ in model.visual.named_parameters() if "lora_A" in n]
        assert all(".attn" in n or "attnpool" in n for n in visual) and len(visual) >= 2
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable if not n.startswith("logit_"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a trained adapter: B no longer zero
    pixels, tokens = _batch(model.config, 2)
    plain = build_model(model.config).eval()
    plain.load_state_dict(merged_copy(model).state_dict())
    with torch.no_grad():
        for adapted_out, merged_out, base in ((model.encode_image(pixels), plain.encode_image(pixels), "image"),
                                              (model.encode_text(tokens), plain.encode_text(tokens), "text")):
            assert (adapted_out - merged_out).abs().max() <= 1e-5, base
    unadapted = _model(family).eval()
    with torch.no_grad():
        assert (unadapted.encode_image(pixels) - plain.encode_image(pixels)).abs().max() > 1e-4


# ---- through the weights a user has: a file with its architecture record, loaded with phi='auto'


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (the network saved, clip.CLIP read back from its file with phi='auto', images), built on first use."""
    from clip import CLIP
    from tests.test_siglip_jobs import SIGLIP_PREPROCESS
    from tests.test_siglip_tokenizer import write_tokenizer

    root = tmp_path_factory.mktemp("families")
    images = []
    for i, colour in enumerate(((220, 20, 20), (20, 20, 220))):
        images.append(Image.new("RGB", (70 + 12 * i, 60), colour))
        images[-1].paste((240, 240, 0), (10, 10, 30 + 10 * i, 40))
    cache = {}

    def get(family: str):
        if family not in cache:
            net = _model(family).eval()
            if family == "siglip":
                with torch.no_grad():
                    net.logit_bias.fill_(-1.0)
                    net.logit_scale.fill_(math.log(8.0))
            folder = root / family
            folder.mkdir()
            if family == "siglip":
                write_tokenizer(folder)
            elif family == "clipa":
                from tests.test_clipa import _tokenizer_folder

                _tokenizer_folder(folder)
            path = folder / "weights.pth"
            save_weights(net.state_dict(), path, net.config, "custom",
                         SIGLIP_PREPROCESS if family == "siglip" else OPENAI)
            model = CLIP(model_path=str(path), phi="auto", cuda=False, precision="fp32")
            cache[family] = (net, model, images)
        return cache[family]

    return get


LABELS = ["dog", "cat", "red car"]


@pytest.mark.parametrize("family", NAMES)
def test_zero_shot_and_embed_through_the_saved_weights_equal_the_saved_network_within_1e_4(saved, family):
    from utils.predict.embed import Item, item_features

    net, model, images = saved(family)
    assert model.net.config == net.config
    classes = model.class_embeddings(LABELS, "a photo of a {c}.")
    with torch.no_grad():
        text = F.normalize(net.encode_text(model.tokenize([f"a photo of a {c}." for c in LABELS])), dim=-1)
        for image in images:
            pixels = model.preprocess(image)
            cos = F.normalize(net.encode_image(pixels), dim=-1) @ text.t()
            logits = net.logit_scale.exp() * cos + (net.logit_bias if net.logit_bias is not None else 0)
            expected = (logits.sigmoid() if family == "siglip" else logits.softmax(-1)).numpy()
            got = model.classify(image, classes)
            assert abs(got - expected).max() <= 1e-4
            assert cos.abs().max() > 1e-3  # features, not zeros
    tmp = model.weights_path.parent  # embed reads files: the two images saved beside the weights
    items = []
    for i, image in enumerate(images):
        image.save(tmp / f"photo{i}.png")
        items.append(Item(str(tmp / f"photo{i}.png"), captions=(f"a photo of a {LABELS[i]}.",)))
    problems = []
    (feats, caps, rows), = list(item_features(model, items, batch_size=2, problems=problems))
    assert not problems and len(rows) == 2
    with torch.no_grad():
        pixels = torch.cat([model.preprocess(Image.open(item.image_path)) for item in items])
        want_image = F.normalize(net.encode_image(pixels), dim=-1)
        want_text = F.normalize(net.encode_text(model.tokenize([item.captions[0] for item in items])), dim=-1)
    assert (F.normalize(feats, dim=-1) - want_image).abs().max() <= 1e-4
    assert (caps - want_text).abs().max() <= 1e-4


# Quick: a RoPE trunk and a convolutional one; the others (10-30 s each) with the slow tests.
ONNX_QUICK = {"eva02", "convnext"}


# OpenAI's ViT and ResNet, SigLIP and CLIPA export in tests/test_onnx.py, test_resnet_product.py,
# test_siglip_jobs.py and test_onnx_hf.py.
ONNX_ELSEWHERE = {"openai-vit", "openai-resnet", "siglip", "clipa"}


@pytest.mark.parametrize("family", [f if f in ONNX_QUICK else pytest.param(f, marks=pytest.mark.slow) for f in NAMES
                                    if f not in ONNX_ELSEWHERE])
def test_onnx_export_equals_pytorch_within_1e_4(saved, family):
    pytest.importorskip("onnxruntime")
    from utils.export.onnx_export import export_files

    _, model, _ = saved(family)
    lines = []
    files = export_files(model, log=lines.append)
    assert {"image.onnx", "text.onnx", "config.json"} <= set(files)
    differences = [float(line.split("PyTorch fp32| = ")[1].split()[0]) for line in lines]
    assert len(differences) == 2 and max(differences) <= 1e-4, lines


# transformers' class for each family that has one; the others are refused in one line naming why.
HF_CLASSES = {"openai-vit": "CLIPModel", "siglip": "SiglipModel"}
HF_REFUSALS = {"openai-resnet": "ResNet", "clipa": "CLIPA", **{f: "timm's" for f in
                                                              ("eva01", "eva02", "convnext", "vitamin", "pe-core",
                                                               "mobileclip-vit")}}


@pytest.mark.parametrize("family", NAMES)
def test_export_hf_writes_transformers_class_within_1e_4_or_refuses_in_one_line(saved, family, tmp_path):
    from utils.export import hf

    net, model, _ = saved(family)
    reason = hf.refusal(net.config)
    if family not in HF_CLASSES:
        assert reason is not None and HF_REFUSALS[family] in reason and "\n" not in reason
        return
    assert reason is None
    worst = []
    hf.write_folder(tmp_path / "hf", hf.export_files(model),
                    lambda temp: worst.append(hf.compare(temp, model, log=lambda line: None)))
    assert (tmp_path / "hf" / "config.json").is_file() and HF_CLASSES[family] in \
        (tmp_path / "hf" / "config.json").read_text()
    assert worst[0] <= 1e-4, worst


def _altclip() -> CLIPConfig:
    from dataclasses import replace

    text = TextConfig(kind="altclip", context_length=512, vocab_size=250002, width=1024, layers=24, heads=16,
                      activation="gelu", intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1,
                      tokenizer="xlm-roberta-large", project_dim=768)
    return replace(get_config("ViT-L-14"), embed_dim=768, text=text)


# The families built after the jobs above were checked at a small size (their own tests check their jobs, and
# test_onnx_hf.py their ONNX export): what export_hf says of each real row, in one line, before any weight is read.
LATER = {"fastvit": lambda: get_config("MobileCLIP2-S0"), "hf-text": lambda: get_config("xlm-roberta-base-ViT-B-32"),
         "worldwide": lambda: get_config("ViT-H-14-worldwide"), "coca": lambda: get_config("coca_ViT-B-32"),
         "altclip": _altclip}
LATER_HF_REFUSALS = {"fastvit": "timm's", "hf-text": "open_clip's", "coca": "CoCa"}
# Written as these classes (tests/test_export_hf_families.py checks the folders).
LATER_HF_CLASSES = {"worldwide": "MetaClip2Model", "altclip": "AltCLIPModel"}


@pytest.mark.parametrize("family", list(LATER))
def test_later_families_are_exported_or_refused_by_export_hf_in_one_line(family):
    from utils.export import hf

    config = LATER[family]()
    reason = hf.refusal(config)
    if family in LATER_HF_CLASSES:
        assert reason is None and hf.transformers_class(config) == LATER_HF_CLASSES[family]
    else:
        assert reason is not None and LATER_HF_REFUSALS[family] in reason and "\n" not in reason
