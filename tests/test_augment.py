"""Augmentation keeps captions true: no flips or colour changes by default, flips swap left/right in "strong"."""
import json

import pytest
import torch
from PIL import Image

from utils.data.augment import CaptionAugment, augment_level, mirror_caption, names_colour
from utils.data.images import eval_transform
from utils.dataloader import CaptionDataset
from utils.errors import UserError
from utils.tokenizer import build_tokenizer

SEEDS = range(40)


def _run(augment: CaptionAugment, image: Image.Image, caption: str, seed: int) -> tuple[torch.Tensor, str]:
    torch.manual_seed(seed)
    return augment(image, caption)


def _dark_left_bright_right(size: int = 96) -> Image.Image:
    image = Image.new("RGB", (size, size), (250, 250, 250))
    image.paste((10, 10, 10), (0, 0, size // 2, size))
    return image


def _left_is_darker(pixels: torch.Tensor) -> bool:
    half = pixels.shape[-1] // 2
    return bool(pixels[..., :half].mean() < pixels[..., half:].mean())


@pytest.mark.parametrize("caption, mirrored", [
    ("a dog on the left of the car", "a dog on the right of the car"),
    ("Left lane, RIGHT lane, rightmost seat, left-hand drive", "Right lane, LEFT lane, leftmost seat, right-hand drive"),
    ("leftover bright lights", "leftover bright lights"),
    ("左边有一个绿色的三角形，右上方有一个圆", "右边有一个绿色的三角形，左上方有一个圆"),
])
def test_mirror_caption_swaps_sides_and_nothing_else(caption, mirrored):
    assert mirror_caption(caption) == mirrored
    assert mirror_caption(mirrored) == caption


@pytest.mark.parametrize("caption, has_colour", [
    ("a red car", True), ("Two GREY cats", True), ("a reddish sky", True), ("a dark room", True),
    ("a dog on the grass", False), ("a bored predictor", False), ("一个红色的圆形", True), ("一只狗在草地上", False),
])
def test_names_colour(caption, has_colour):
    assert names_colour(caption) is has_colour


def test_light_never_flips_and_never_changes_colour():
    light, none = CaptionAugment(64, "light"), CaptionAugment(64, "none")
    red = Image.new("RGB", (80, 80), (215, 40, 40))
    reference, _ = none(red, "a wall")
    for seed in SEEDS:
        pixels, caption = _run(light, _dark_left_bright_right(), "a dark square on the left", seed)
        assert caption == "a dark square on the left" and _left_is_darker(pixels)
        # A crop of one colour is that colour: any colour op would show.
        assert torch.allclose(_run(light, red, "a wall", seed)[0], reference, atol=1e-5)


def test_none_is_the_evaluation_preprocessing():
    image = _dark_left_bright_right(120)
    pixels, caption = CaptionAugment(64, "none")(image, "a caption")
    assert caption == "a caption" and torch.equal(pixels, eval_transform(64)(image))
    letterboxed, _ = CaptionAugment(64, "none", letterbox=True)(image, "x")
    assert torch.equal(letterboxed, eval_transform(64, letterbox=True)(image))


def test_strong_flips_with_the_caption_and_keeps_named_colours():
    strong, none = CaptionAugment(64, "strong"), CaptionAugment(64, "none")
    flips = 0
    for seed in SEEDS:
        pixels, caption = _run(strong, _dark_left_bright_right(), "a dark square on the left", seed)
        flipped = not _left_is_darker(pixels)
        assert caption == ("a dark square on the right" if flipped else "a dark square on the left")
        flips += flipped
    assert 8 <= flips <= 32  # about half of 40

    red = Image.new("RGB", (80, 80), (215, 40, 40))
    reference, _ = none(red, "x")
    for caption in ("a red wall", "一面红色的墙"):
        for seed in SEEDS:
            assert torch.allclose(_run(strong, red, caption, seed)[0], reference, atol=1e-5)
    changed = sum(not torch.allclose(_run(strong, red, "a wall", seed)[0], reference, atol=1e-3) for seed in SEEDS)
    assert changed >= len(SEEDS) // 2  # colour jitter does act on captions that name no colour


def test_levels_and_the_originals_switch():
    assert augment_level("light", True) == "light" and augment_level("strong", False) == "none"
    with pytest.raises(UserError, match="augment 'heavy' is not one of light, none, strong"):
        augment_level("heavy", True)


def test_augmentation_depends_only_on_seed_epoch_and_index(tmp_path):
    _dark_left_bright_right().save(tmp_path / "a.png")
    entries = [{"image": "a.png", "caption": ["a dark square on the left", "black on the left, white on the right"]}]
    (tmp_path / "set.json").write_text(json.dumps(entries))
    tokenizer = build_tokenizer("openai", 77)
    first = CaptionDataset(entries, tmp_path, CaptionAugment(64, "strong"), tokenizer, seed=5)
    second = CaptionDataset(entries, tmp_path, CaptionAugment(64, "strong"), tokenizer, seed=5)
    torch.manual_seed(123)  # the global generator must not matter
    samples = [first[(epoch, 0)] for epoch in range(8)]
    for epoch, (pixels, tokens) in enumerate(samples):
        again_pixels, again_tokens = second[(epoch, 0)]
        assert torch.equal(pixels, again_pixels) and torch.equal(tokens, again_tokens)
        # The caption the model sees is true of the pixels it sees: its first side word is the dark side.
        text = tokenizer.decode(tokens.tolist())
        first_side = min(("left", "right"), key=lambda side: text.find(side) % len(text))
        assert (first_side == "left") == _left_is_darker(pixels), (epoch, text)
    assert len({tuple(t.tolist()) for _, t in samples}) > 1
