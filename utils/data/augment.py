"""Training augmentation that keeps each caption true of its augmented image.

A caption is a claim about the picture: a horizontal flip turns "a dog on the left of the car" false, and
colour, posterize or solarize changes falsify "a red car". So every level transforms the image and its
caption together, `(image, caption) -> (pixels, caption)`, and only in ways under which the pair stays true:

- "none": resize + centre crop (or letterbox), as at evaluation.
- "light" (default): a random resized crop of 90-100% of the image, no flip, no colour change: the recipe
  CLIP-style training uses (open_clip's default scale).
- "strong": a crop of 50-100%; a flip half the time, with left/right swapped in the caption ("left" <->
  "right", 左 <-> 右); brightness, contrast, saturation, hue and greyscale changes only for captions that
  name no colour or brightness. A flip still mirrors text, digits and logos in the picture.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from PIL import Image

from utils.data.images import Resized, crop_sides, eval_transform, to_tensor
from utils.data.preprocess import Preprocess
from utils.errors import UserError

if TYPE_CHECKING:
    import torch

AUGMENTS = ("light", "none", "strong")
CROP_SCALES = {"light": (0.9, 1.0), "strong": (0.5, 1.0)}

_SIDES_EN = {"left": "right", "leftmost": "rightmost", "lefthand": "righthand", "leftward": "rightward",
             "leftwards": "rightwards"}
_SIDES_EN |= {v: k for k, v in _SIDES_EN.items()}
_SIDE_WORD = re.compile(r"\b(" + "|".join(sorted(_SIDES_EN, key=len, reverse=True)) + r")\b", re.IGNORECASE)
_SIDES_CN = str.maketrans({"左": "右", "右": "左"})

_COLOUR_WORD = re.compile(
    r"\b(red|green|blue|yellow|orange|purple|violet|pink|brown|black|white|gr[ae]y|gold|golden|silver|beige|cyan|"
    r"magenta|turquoise|teal|navy|maroon|crimson|scarlet|tan|khaki|olive|lime|indigo|ivory|blond|blonde|"
    r"colou?r|colou?red|colou?rful|bright|dark|light|pale|shiny|sunny|night|shadow|monochrome)(s|dish|ish)?\b",
    re.IGNORECASE)
# Chinese colour words all carry one of these characters (红色, 浅蓝, 金黄, 颜色, 黑暗 ...).
_COLOUR_CHARS_CN = re.compile("[红绿蓝黄橙紫粉棕褐黑白灰金银青色彩亮暗]")


def mirror_caption(caption: str) -> str:
    """The caption of the horizontally flipped image: left and right swapped, case kept."""
    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = _SIDES_EN[word.lower()]
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other

    return _SIDE_WORD.sub(swap, caption).translate(_SIDES_CN)


def names_colour(caption: str) -> bool:
    """Whether the caption says anything a colour or brightness change could make false."""
    return bool(_COLOUR_WORD.search(caption) or _COLOUR_CHARS_CN.search(caption))


def augment_level(augment: str, datasets_random: bool) -> str:
    """train.py's `augment`, with the original's `datasets_random=False` meaning "none"."""
    if augment not in AUGMENTS:
        raise UserError(f"augment {augment!r} is not one of {', '.join(AUGMENTS)}")
    return augment if datasets_random else "none"


class CaptionAugment:
    """`(image, caption) -> (pixels, caption)` at one of AUGMENTS; random draws use torch's global generator,
    which CaptionDataset seeds per sample. `preprocess`: the weights' record (utils/data/preprocess.py), whose
    mean, std, filter and resize mode the crops use: a `longest` or `squash` record (or `letterbox`) makes the
    square first and crops from it, as at evaluation. `sides`: the (short, long) pixels an image must keep for
    it (utils/data/images.open_image)."""

    def __init__(self, size: int, level: str = "light", letterbox: bool = False, preprocess: Preprocess | None = None):
        if level not in AUGMENTS:
            raise UserError(f"augment {level!r} is not one of {', '.join(AUGMENTS)}")
        self.level = level
        if level == "none":
            self.geometry, self.colour = eval_transform(size, letterbox, preprocess), None
            self.preprocess = self.geometry.preprocess
            self.sides = self.geometry.decode_sides()
            return
        from torchvision.transforms import InterpolationMode, v2

        self.preprocess = record = eval_transform(size, letterbox, preprocess).preprocess
        crop = v2.RandomResizedCrop(size, scale=CROP_SCALES[level], interpolation=InterpolationMode(record.interpolation))
        self.sides = crop_sides(size, crop.scale, crop.ratio, record.resize_mode)
        squared = [Resized(size, record)] if record.resize_mode != "shortest" else []
        self.geometry = v2.Compose([*squared, crop, *to_tensor(record)])
        self.colour = v2.Compose([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
                                  v2.RandomGrayscale(p=0.2)]) if level == "strong" else None

    def decode_sides(self) -> tuple[int, int]:
        """(short, long) pixels the decoder must keep for this augmentation to only downscale."""
        return self.sides

    def __call__(self, image: Image.Image, caption: str) -> tuple[torch.Tensor, str]:
        import torch

        if self.level == "strong":
            if torch.rand(()) < 0.5:
                image, caption = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), mirror_caption(caption)
            if not names_colour(caption):
                image = self.colour(image)
        return self.geometry(image), caption
