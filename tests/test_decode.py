"""Reduced-scale decoding never yields fewer pixels than the transform needs, and changes nothing but JPEG speed.

`open_image(path, sides)` may decode a JPEG at 1/2, 1/4 or 1/8 scale; these tests pin "never smaller than
needed" on odd sizes, EXIF-rotated, CMYK and greyscale JPEGs, with random resized crops, and that other formats
and `sides=None` (fast_decode=False) are the full decode, pixel for pixel.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from utils.data.augment import CROP_SCALES, CaptionAugment
from utils.data.images import crop_sides, eval_sides, eval_transform, open_image, open_rgb

ODD_SIZES = [(1001, 777), (777, 1001), (449, 1799), (1801, 225), (100, 60)]


def photo(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth colour blobs with noise: compresses and scales like a photograph, unlike flat colour."""
    rng = np.random.default_rng(seed)
    smooth = Image.fromarray(rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    pixels = np.asarray(smooth, dtype=np.int16) + rng.normal(0, 4, (size[1], size[0], 1)).astype(np.int16)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image.convert(mode) if mode != "RGB" else image


def jpeg(tmp_path, size, mode="RGB", orientation=None, name="photo.jpg"):
    path = tmp_path / name
    image = photo(size, mode)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(path, quality=92, exif=exif.tobytes())
    return path


def short_long(image: Image.Image) -> tuple[int, int]:
    return min(image.size), max(image.size)


@pytest.mark.parametrize("size", ODD_SIZES)
@pytest.mark.parametrize("letterbox", [False, True])
def test_jpegs_of_odd_sizes_keep_what_resize_and_crop_or_letterbox_need(tmp_path, size, letterbox):
    path = jpeg(tmp_path, size)
    need_short, need_long = eval_sides(224, letterbox)
    full = open_rgb(path)
    reduced = open_image(path, (need_short, need_long))
    short, long = short_long(reduced)
    # Never below the need, unless the file itself is smaller (then it is decoded whole).
    assert short >= min(need_short, min(full.size)) and long >= min(need_long, max(full.size))
    assert (reduced.width >= reduced.height) == (full.width >= full.height)
    if min(size) >= 2 * need_short and max(size) >= 2 * need_long:
        assert reduced.width < full.width, "an image twice the need must decode smaller"


def test_the_need_is_met_at_every_scale_boundary(tmp_path):
    """Sides just above and below k * need for each of libjpeg's factors: the chosen k never overshoots."""
    for k in (2, 4, 8):
        for short in (k * 224 - 1, k * 224, k * 224 + 1):
            path = jpeg(tmp_path, (short + 131, short), name=f"{k}_{short}.jpg")
            assert min(open_image(path, (224, 224)).size) >= 224


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpegs_come_upright_with_the_need_met(tmp_path, orientation):
    path = jpeg(tmp_path, (1601, 1203), orientation=orientation)
    full, reduced = open_rgb(path), open_image(path, (224, 224))
    assert (full.width > full.height) == (reduced.width > reduced.height) == (orientation == 3)
    assert min(reduced.size) >= 224 and reduced.width < full.width
    # The same picture, not a turned one: compared at one small size, pixels agree within JPEG noise.
    a = np.asarray(full.resize((64, 64), Image.BILINEAR, reducing_gap=None), dtype=np.float32)
    b = np.asarray(reduced.resize((64, 64), Image.BILINEAR), dtype=np.float32)
    assert np.abs(a - b).mean() < 3


@pytest.mark.parametrize("mode", ["CMYK", "L"])
def test_cmyk_and_greyscale_jpegs_decode_reduced_to_rgb(tmp_path, mode):
    path = jpeg(tmp_path, (1203, 901), mode=mode)
    full, reduced = open_rgb(path), open_image(path, (224, 224))
    assert reduced.mode == "RGB" and min(reduced.size) >= 224 and reduced.width < full.width
    a = np.asarray(full.resize(reduced.size, Image.BOX), dtype=np.float32)
    assert np.abs(a - np.asarray(reduced, dtype=np.float32)).mean() < 3


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP"])
def test_other_formats_are_decoded_in_full_pixel_for_pixel(tmp_path, fmt):
    path = tmp_path / f"image.{fmt.lower()}"
    photo((1001, 777)).save(path, fmt)
    full, reduced = open_rgb(path), open_image(path, (224, 224))
    assert reduced.size == full.size and np.array_equal(np.asarray(reduced), np.asarray(full))


def test_sides_none_is_the_full_decode_and_bytes_open_alike(tmp_path):
    path = jpeg(tmp_path, (1001, 777))
    with Image.open(path) as image:
        expected = np.asarray(image.convert("RGB"))
    assert np.array_equal(np.asarray(open_image(path, None)), expected)
    assert np.array_equal(np.asarray(open_image(path.read_bytes(), (224, 224))), np.asarray(open_image(path, (224, 224))))
    assert np.array_equal(np.asarray(open_image(io.BytesIO(path.read_bytes()), None)), expected)


@pytest.mark.parametrize("level", sorted(CROP_SCALES))
@pytest.mark.parametrize("aspect", [1.0, 3 / 4, 3.0])
def test_every_random_resized_crop_of_a_reduced_image_is_at_least_the_model_size(tmp_path, level, aspect):
    """The smallest crop RandomResizedCrop may draw still spans `size` source pixels a side."""
    size = 224
    crop = RandomResizedCrop(size, scale=CROP_SCALES[level])
    need = crop_sides(size, crop.scale, crop.ratio)
    assert CaptionAugment(size, level).sides == need
    # The worst case the decoder may hand over: the short side exactly at the need.
    w, h = (round(need[0] * aspect), need[0]) if aspect >= 1 else (need[0], round(need[0] / aspect))
    image = torch.zeros(3, h, w)
    torch.manual_seed(0)
    sides = [RandomResizedCrop.get_params(image, crop.scale, crop.ratio)[2:] for _ in range(1000)]
    assert min(min(s) for s in sides) >= size
    # The bound is tight enough to matter: a decode at the plain resize-and-crop need would crop below it.
    image = torch.zeros(3, size, round(size * aspect) if aspect >= 1 else size)
    if aspect == 1.0:
        assert min(min(RandomResizedCrop.get_params(image, crop.scale, crop.ratio)[2:]) for _ in range(300)) < size


def test_reduced_decode_changes_the_model_input_little(tmp_path):
    """What fast_decode costs: the 224 px input of a reduced decode against the full decode's."""
    path = jpeg(tmp_path, (2016, 1512))
    transform = eval_transform(224)
    full = transform(open_rgb(path))
    reduced = transform(open_image(path, eval_sides(224)))
    assert full.shape == reduced.shape == (3, 224, 224)
    assert (full - reduced).abs().mean() < 0.02


@pytest.mark.parametrize("letterbox", [False, True])
def test_eval_transform_equals_torchvision_v2_bit_for_bit(letterbox):
    """EvalTransform leaves torchvision out of inference start-up; its output must not change for it."""
    from torchvision.transforms import InterpolationMode, v2

    from utils.data.images import to_tensor

    if letterbox:  # open_clip's resize_mode='longest', on the grey canvas this project letterboxes onto
        from open_clip.transform import CenterCropOrPad, ResizeKeepRatio

        geometry = [ResizeKeepRatio(64, longest=1, interpolation=InterpolationMode.BICUBIC),
                    CenterCropOrPad(64, fill=(128, 128, 128))]
    else:
        geometry = [v2.Resize(64, interpolation=InterpolationMode.BICUBIC), v2.CenterCrop(64)]
    reference = v2.Compose([*geometry, *to_tensor()])
    for size in [(97, 61), (61, 97), (64, 64), (65, 300), (33, 20)]:
        image = photo(size)
        assert torch.equal(eval_transform(64, letterbox)(image), reference(image)), size
