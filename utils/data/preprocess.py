"""The preprocessing a model's weights were trained with, one record read from whatever came with the weights.

As open_clip's per-tag `PreprocessCfg` and torchvision's `Weights.transforms`: mean and std are facts about the
weights (LAION's ViT-L-14 laion2b_s32b_b82k was trained with 0.5, not OpenAI's values), as are the resampling
filter and how a picture becomes a square (`shortest`: resize the short side and crop the centre; `longest`:
resize the long side and pad; `squash`: resize both sides, no crop). Everything that makes model input asks the
record, never a module constant.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Mapping

from utils.errors import UserError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)
LETTERBOX_FILL = (128, 128, 128)
RESIZE_MODES = ("shortest", "longest", "squash")
# PIL's filter numbers, as transformers' `resample` writes them.
PIL_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


@dataclass(frozen=True)
class Preprocess:
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"  # a key of PIL_FILTERS
    resize_mode: str = "shortest"  # one of RESIZE_MODES
    fill: tuple[int, int, int] = LETTERBOX_FILL  # the canvas of `longest`

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(x) for x in _three(self.mean, "mean")))
        object.__setattr__(self, "std", tuple(float(x) for x in _three(self.std, "std")))
        object.__setattr__(self, "fill", tuple(int(x) for x in _three(self.fill, "fill")))
        if self.interpolation not in PIL_FILTERS:
            raise UserError(f"interpolation {self.interpolation!r} is not one of {', '.join(PIL_FILTERS)}")
        if self.resize_mode not in RESIZE_MODES:
            raise UserError(f"resize_mode {self.resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
        if not all(s > 0 for s in self.std):
            raise UserError(f"std {self.std} must be positive")

    def letterboxed(self) -> "Preprocess":
        """The record with the whole picture kept (letterbox_image=True asks for it whatever the weights say)."""
        return replace(self, resize_mode="longest")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping, source: str) -> "Preprocess":
        """The record `to_dict` wrote (this project's files); `source` names the file in the message."""
        try:
            return cls(**{k: data[k] for k in ("mean", "std", "interpolation", "resize_mode", "fill") if k in data})
        except (TypeError, ValueError, UserError) as e:
            raise UserError(f"{source}: the preprocessing record {data!r} is not valid ({e})") from e

    @classmethod
    def from_open_clip(cls, cfg: Mapping, source: str) -> "Preprocess":
        """open_clip's `preprocess_cfg` (an open_clip_config.json) with open_clip's defaults for what it leaves out.
        A `longest` record pads as open_clip does (`fill_color`, 0 = black, when left out); for the others the fill
        is only used by letterbox_image=True, which keeps this project's grey."""
        fill = cfg.get("fill_color", 0 if cfg.get("resize_mode") == "longest" else LETTERBOX_FILL)
        # open_clip's choices; 'random' (a training option) is bicubic at inference, as open_clip makes it.
        interpolation = {None: "bicubic", "random": "bicubic"}.get(cfg.get("interpolation"), cfg.get("interpolation"))
        try:
            if interpolation not in ("bicubic", "bilinear"):
                raise UserError(f"interpolation {interpolation!r} is not one of bicubic, bilinear, random")
            return cls(mean=_channels(cfg.get("mean") or OPENAI_MEAN), std=_channels(cfg.get("std") or OPENAI_STD),
                       interpolation=interpolation,
                       resize_mode=cfg.get("resize_mode") or "shortest", fill=_channels(fill))
        except (TypeError, ValueError, UserError) as e:
            raise UserError(f"{source}: preprocess_cfg {cfg!r} is not valid ({e})") from e

    @classmethod
    def from_transformers(cls, cfg: Mapping, source: str) -> "Preprocess":
        """A transformers `preprocessor_config.json` (CLIPImageProcessor's keys): a `shortest_edge` resize with a
        centre crop is `shortest`, a `height` x `width` resize without one is `squash`."""
        size = cfg.get("size", {})
        square = isinstance(size, Mapping) and "height" in size and "shortest_edge" not in size
        names = {code: name for name, code in PIL_FILTERS.items()}
        try:
            normalise = cfg.get("do_normalize", True)
            return cls(mean=_channels(cfg.get("image_mean", OPENAI_MEAN)) if normalise else (0.0, 0.0, 0.0),
                       std=_channels(cfg.get("image_std", OPENAI_STD)) if normalise else (1.0, 1.0, 1.0),
                       interpolation=names[int(cfg.get("resample", 3))],
                       resize_mode="squash" if square and not cfg.get("do_center_crop", False) else "shortest")
        except (KeyError, TypeError, ValueError, UserError) as e:
            raise UserError(f"{source}: image_mean/image_std/resample/size are not valid ({e})") from e

    def to_transformers(self, size: int) -> dict:
        """The settings of CLIPImageProcessor that compute this record at `size` (`longest` has none)."""
        resize = ({"size": {"height": size, "width": size}, "do_center_crop": False} if self.resize_mode == "squash"
                  else {"size": {"shortest_edge": size}, "do_center_crop": True,
                        "crop_size": {"height": size, "width": size}})
        return {"do_convert_rgb": True, "do_resize": True, **resize, "resample": PIL_FILTERS[self.interpolation],
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": list(self.mean), "image_std": list(self.std)}



def _channels(value) -> tuple:
    """open_clip writes one number for all three channels where they are equal."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * 3


def _three(value, name: str) -> tuple:
    value = tuple(value)
    if len(value) != 3:
        raise UserError(f"{name} {value} needs one value per RGB channel")
    return value


OPENAI = Preprocess()
