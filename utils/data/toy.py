"""Deterministic toy captioned-image dataset in the clip-pytorch JSON format.

Each image holds one to three coloured shapes on a lightly textured background. Every
caption (five English, five Chinese per image) names the colour and shape of each object,
and colours repeat across many images, so matching a caption means binding colour to shape
and counting, not spotting a colour.

Written to disk by `make_toy_dataset` (the demo, tests and benchmarks call it) or by
`python datasets/make_toy.py --out datasets/toy --n-train 3000 --n-val 500`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
COLOURS_CN = {
    "red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色",
    "purple": "紫色", "orange": "橙色", "white": "白色", "black": "黑色",
}
SHAPES_CN = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形", "cross": "十字形"}
SHAPES = tuple(SHAPES_CN)
# No background name contains a shape colour's name ("light blue" would put "blue"/"蓝色"
# into captions of images with no blue object).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (150, 150, 150), "beige": (220, 205, 175), "pink": (235, 195, 205), "cyan": (165, 215, 215),
}
BACKGROUNDS_CN = {"grey": "灰色", "beige": "米色", "pink": "粉色", "cyan": "青色"}
# Layout cells of a 3x3 grid, row-major: cell = row * 3 + column.
POSITIONS_EN = (
    "in the top left", "at the top", "in the top right",
    "on the left", "in the centre", "on the right",
    "in the bottom left", "at the bottom", "in the bottom right",
)
POSITIONS_CN = ("左上方", "上方", "右上方", "左边", "中间", "右边", "左下方", "下方", "右下方")
NUMBERS_EN = {1: "one", 2: "two", 3: "three"}
NUMBERS_CN = {1: "一个", 2: "两个", 3: "三个"}
SPLITS = ("train", "val")
CAPTIONS_PER_IMAGE = 5
SUPERSAMPLE = 4  # draw at 4x and box-filter down, for anti-aliased edges


def _star(points: int, inner: float) -> list[tuple[float, float]]:
    angles = [-math.pi / 2 + i * math.pi / points for i in range(2 * points)]
    return [((1.0 if i % 2 == 0 else inner) * math.cos(a), (1.0 if i % 2 == 0 else inner) * math.sin(a))
            for i, a in enumerate(angles)]


_ARM = 0.3  # half-thickness of the cross's arms
# Polygons in units of the object radius; y points down, so -pi/2 is "up". The square's
# half-side is 0.8 so its corners stay inside the radius at the largest rotation used.
UNIT_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)],
    "star": _star(5, 0.45),
    "cross": [(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM),
              (_ARM, 1), (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)],
}


@dataclass(frozen=True)
class ToyObject:
    colour: str
    shape: str
    cell: int  # 0..8 in the 3x3 layout grid; decides the position words
    large: bool
    cx: float  # centre and radius in pixels of the final image
    cy: float
    radius: float
    angle: float  # rotation in degrees; circles ignore it


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ToyObject, ...]


def sample_scene(rng: np.random.Generator, size: int) -> Scene:
    """Draw a background and 1-3 objects with distinct (colour, shape) pairs and cells."""
    count = int(rng.integers(1, 4))
    kinds: list[tuple[str, str]] = []
    while len(kinds) < count:
        kind = (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))
        if kind not in kinds:
            kinds.append(kind)
    large = rng.random(count) < 0.5
    background = str(rng.choice(list(BACKGROUNDS)))
    cell_size = size / 3
    # Two large shapes in adjacent cells cannot both fit, so redraw cells and jitter until
    # everything is separated; three large shapes always fit in the corners, so this ends fast.
    for _ in range(1000):
        cells = rng.choice(9, size=count, replace=False)
        objects = []
        for (colour, shape), cell, is_large in zip(kinds, cells, large):
            radius = size * (rng.uniform(0.14, 0.17) if is_large else rng.uniform(0.075, 0.095))
            row, column = divmod(int(cell), 3)
            cx, cy = (np.array([column, row]) + 0.5) * cell_size + rng.uniform(-0.05, 0.05, 2) * size
            objects.append(ToyObject(
                colour=colour, shape=shape, cell=int(cell), large=bool(is_large),
                cx=float(np.clip(cx, radius + 1, size - radius - 1)),
                cy=float(np.clip(cy, radius + 1, size - radius - 1)),
                radius=float(radius), angle=float(rng.uniform(-20, 20)),
            ))
        if _separated(objects, gap=0.03 * size):
            return Scene(background=background, objects=tuple(objects))
    raise RuntimeError("could not lay out objects without overlap")


def _separated(objects: Sequence[ToyObject], gap: float) -> bool:
    return all(math.hypot(a.cx - b.cx, a.cy - b.cy) >= a.radius + b.radius + gap
               for i, a in enumerate(objects) for b in objects[i + 1:])


def render_scene(scene: Scene, rng: np.random.Generator, size: int) -> Image.Image:
    """Paint a scene as an RGB image of size x size pixels."""
    coords = np.arange(size) - size / 2
    direction = rng.uniform(0, 2 * math.pi)
    ramp = (math.cos(direction) * coords[None, :] + math.sin(direction) * coords[:, None]) / size
    # A faint tint and gradient so backgrounds differ between images and are not flat fields
    # that JPEG encodes trivially. It is computed at the final size and upsampled by pixel
    # repetition, which the box reduction below undoes exactly away from the shapes, so the float
    # work stays off the 16x larger canvas.
    base = np.array(BACKGROUNDS[scene.background], dtype=float) + rng.uniform(-6, 6, 3)
    background = np.clip(base + ramp[..., None] * rng.uniform(5, 25), 0, 255).astype(np.uint8)
    big = size * SUPERSAMPLE
    canvas = Image.fromarray(background).resize((big, big), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[obj.colour]) + rng.integers(-12, 13, 3), 0, 255))
        cx, cy, r = obj.cx * SUPERSAMPLE, obj.cy * SUPERSAMPLE, obj.radius * SUPERSAMPLE
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            continue
        cos, sin = math.cos(math.radians(obj.angle)), math.sin(math.radians(obj.angle))
        draw.polygon([(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos))
                      for x, y in UNIT_OUTLINES[obj.shape]], fill=fill)
    pixels = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=float)
    pixels = pixels + rng.normal(0.0, 3.0, pixels.shape)  # sensor-like noise for realistic JPEGs
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _en_object(obj: ToyObject, *, sized: bool = False, placed: bool = False) -> str:
    words = (["large" if obj.large else "small"] if sized else []) + [obj.colour, obj.shape]
    phrase = f"{_article(words[0])} {' '.join(words)}"
    return f"{phrase} {POSITIONS_EN[obj.cell]}" if placed else phrase


def _en_join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _en_count(n: int) -> str:
    return f"{NUMBERS_EN[n]} shape{'' if n == 1 else 's'}"


# Each template gets the objects in a fresh random order and the background name.
EN_TEMPLATES: tuple[Callable[[Sequence[ToyObject], str], str], ...] = (
    lambda objs, bg: _en_join([_en_object(o) for o in objs]),
    lambda objs, bg: _en_join([_en_object(o, sized=True) for o in objs]),
    lambda objs, bg: _en_join([_en_object(o, placed=True) for o in objs]),
    lambda objs, bg: f"{_en_count(len(objs))}: " + _en_join([_en_object(o, placed=True) for o in objs]),
    lambda objs, bg: "a picture with " + _en_join([_en_object(o, sized=True, placed=True) for o in objs]),
    lambda objs, bg: _en_join([_en_object(o) for o in objs]) + f" on a {bg} background",
    lambda objs, bg: f"{_en_count(len(objs))} on a {bg} background: "
    + _en_join([_en_object(o, sized=True) for o in objs]),
    lambda objs, bg: ", ".join(f"{o.colour} {o.shape}" for o in objs),
)


def _cn_object(obj: ToyObject, *, sized: bool = False) -> str:
    size_word = ("大" if obj.large else "小") if sized else ""
    return f"一个{COLOURS_CN[obj.colour]}的{size_word}{SHAPES_CN[obj.shape]}"


def _cn_join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else "、".join(parts[:-1]) + "和" + parts[-1]


CN_TEMPLATES: tuple[Callable[[Sequence[ToyObject], str], str], ...] = (
    lambda objs, bg: _cn_join([_cn_object(o) for o in objs]),
    lambda objs, bg: _cn_join([_cn_object(o, sized=True) for o in objs]),
    lambda objs, bg: "，".join(f"{POSITIONS_CN[o.cell]}有{_cn_object(o)}" for o in objs),
    lambda objs, bg: f"图中有{NUMBERS_CN[len(objs)]}图形："
    + "，".join(f"{_cn_object(o, sized=True)}在{POSITIONS_CN[o.cell]}" for o in objs),
    lambda objs, bg: "一张图片，" + "，".join(f"{POSITIONS_CN[o.cell]}是{_cn_object(o, sized=True)}" for o in objs),
    lambda objs, bg: f"{BACKGROUNDS_CN[bg]}背景上有" + _cn_join([_cn_object(o) for o in objs]),
    lambda objs, bg: f"{BACKGROUNDS_CN[bg]}背景上画着{NUMBERS_CN[len(objs)]}图形："
    + _cn_join([_cn_object(o, sized=True) for o in objs]),
    lambda objs, bg: "、".join(f"{COLOURS_CN[o.colour]}{SHAPES_CN[o.shape]}" for o in objs),
)


def write_captions(scene: Scene, rng: np.random.Generator,
                   templates: Sequence[Callable[[Sequence[ToyObject], str], str]]) -> list[str]:
    """Five captions from five distinct templates, each listing the objects in a random order."""
    chosen = rng.choice(len(templates), size=CAPTIONS_PER_IMAGE, replace=False)
    captions = []
    for template_index in chosen:
        order = rng.permutation(len(scene.objects))
        captions.append(templates[template_index]([scene.objects[i] for i in order], scene.background))
    return captions


def annotation_paths(out_dir: str | Path) -> dict[str, Path]:
    root = Path(out_dir)
    return {f"{lang}_{split}": root / f"{lang}_{split}.json" for lang in ("en", "cn") for split in SPLITS}


def _write_json_atomic(path: Path, entries: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(entries, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def make_toy_dataset(out_dir: str | Path, n_train: int = 3000, n_val: int = 500, seed: int = 0,
                     size: int = 64, force: bool = False) -> dict:
    """Write the toy dataset under out_dir unless its four JSON files already exist.

    Returns {"root", "files" (name -> JSON path), "generated" (False when skipped),
    "seconds", "scenes" (split -> list[Scene] in JSON order; empty when skipped)}.
    Image i of a split depends only on (seed, split, i), so a smaller set is a prefix of a larger one.
    """
    if n_train < 0 or n_val < 0 or seed < 0 or size < 16:
        raise ValueError("need n_train, n_val, seed >= 0 and size >= 16")
    root = Path(out_dir)
    files = annotation_paths(root)
    if not force and all(path.exists() for path in files.values()):
        return {"root": root, "files": files, "generated": False, "seconds": 0.0, "scenes": {}}
    # Drop old annotations first: until the new ones land, the folder must not look complete.
    for path in files.values():
        path.unlink(missing_ok=True)

    start = time.perf_counter()
    scenes: dict[str, list[Scene]] = {}
    entries: dict[str, list[dict]] = {}
    for split_index, (split, count) in enumerate(zip(SPLITS, (n_train, n_val))):
        (root / split).mkdir(parents=True, exist_ok=True)
        scenes[split], entries[f"en_{split}"], entries[f"cn_{split}"] = [], [], []
        for index in range(count):
            rng = np.random.default_rng([seed, split_index, index])
            scene = sample_scene(rng, size)
            image_path = f"{split}/{index:06d}.jpg"
            render_scene(scene, rng, size).save(root / image_path, quality=95)
            scenes[split].append(scene)
            entries[f"en_{split}"].append({"image": image_path, "caption": write_captions(scene, rng, EN_TEMPLATES)})
            entries[f"cn_{split}"].append({"image": image_path, "caption": write_captions(scene, rng, CN_TEMPLATES)})
    # Annotations go last, each through a temp file and rename, so an interrupted run never
    # leaves all four in place.
    for name, path in files.items():
        _write_json_atomic(path, entries[name])
    return {"root": root, "files": files, "generated": True,
            "seconds": time.perf_counter() - start, "scenes": scenes}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the toy shapes dataset (clip-pytorch JSON format).")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "datasets" / "toy")
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-val", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--force", action="store_true", help="regenerate even if the JSON files exist")
    args = parser.parse_args(argv)
    result = make_toy_dataset(args.out, args.n_train, args.n_val, args.seed, args.size, args.force)
    if result["generated"]:
        print(f"wrote {args.n_train} train + {args.n_val} val images to {result['root']} "
              f"in {result['seconds']:.1f}s")
    else:
        print(f"{result['root']} already has its annotations; pass --force to regenerate")

