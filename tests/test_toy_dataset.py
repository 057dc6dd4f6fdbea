import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.data.toy import (
    BACKGROUNDS_CN, COLOURS, COLOURS_CN, SHAPES_CN, annotation_paths, main, make_toy_dataset, sample_scene,
)

N_TRAIN, N_VAL, SIZE = 30, 10, 48  # a non-default size, to check it is honoured


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n_train=N_TRAIN, n_val=N_VAL, seed=3, size=SIZE)


def _load(toy: dict, name: str) -> list[dict]:
    return json.loads(toy["files"][name].read_text(encoding="utf-8"))


def _entries_with_scenes(toy: dict, lang: str):
    for split in ("train", "val"):
        yield from zip(_load(toy, f"{lang}_{split}"), toy["scenes"][split])


def test_json_is_a_list_of_images_with_five_captions(toy: dict) -> None:
    assert toy["generated"]
    for split, count in (("train", N_TRAIN), ("val", N_VAL)):
        en, cn = _load(toy, f"en_{split}"), _load(toy, f"cn_{split}")
        assert isinstance(en, list) and len(en) == len(cn) == count
        for en_entry, cn_entry in zip(en, cn):
            assert set(en_entry) == set(cn_entry) == {"image", "caption"}
            assert en_entry["image"] == cn_entry["image"]  # same images, same order
            assert en_entry["image"].startswith(f"{split}/") and not Path(en_entry["image"]).is_absolute()
            for captions in (en_entry["caption"], cn_entry["caption"]):
                assert len(captions) == 5 and all(isinstance(c, str) and c for c in captions)
                assert len(set(captions)) == 5


def test_json_is_utf8_without_escapes(toy: dict) -> None:
    text = toy["files"]["cn_train"].read_text(encoding="utf-8")
    assert "\\u" not in text and "色" in text


def test_every_image_opens_as_rgb_of_requested_size(toy: dict) -> None:
    for name in toy["files"]:
        for entry in _load(toy, name):
            with Image.open(toy["root"] / entry["image"]) as image:
                assert image.format == "JPEG" and image.mode == "RGB" and image.size == (SIZE, SIZE)


def test_same_seed_gives_identical_files(toy: dict, tmp_path: Path) -> None:
    again = make_toy_dataset(tmp_path, n_train=N_TRAIN, n_val=N_VAL, seed=3, size=SIZE)
    for name, path in toy["files"].items():
        assert again["files"][name].read_bytes() == path.read_bytes()
    images = sorted(p.relative_to(toy["root"]) for p in toy["root"].glob("*/*.jpg"))
    assert len(images) == N_TRAIN + N_VAL
    for relative in images:
        assert (tmp_path / relative).read_bytes() == (toy["root"] / relative).read_bytes()


def test_other_seed_gives_other_data(toy: dict, tmp_path: Path) -> None:
    other = make_toy_dataset(tmp_path, n_train=N_TRAIN, n_val=N_VAL, seed=4, size=SIZE)
    assert other["files"]["en_train"].read_bytes() != toy["files"]["en_train"].read_bytes()


def test_english_captions_name_exactly_the_objects_colours_and_shapes(toy: dict) -> None:
    for entry, scene in _entries_with_scenes(toy, "en"):
        for caption in entry["caption"]:
            for obj in scene.objects:
                assert f"{obj.colour} {obj.shape}" in caption, (caption, obj)
            # Background names must not smuggle in a colour that no object has.
            mentioned = {colour for colour in COLOURS if re.search(rf"\b{colour}\b", caption)}
            assert mentioned == {obj.colour for obj in scene.objects}, caption


def test_chinese_captions_are_chinese_and_name_each_object(toy: dict) -> None:
    for entry, scene in _entries_with_scenes(toy, "cn"):
        for caption in entry["caption"]:
            assert re.search(r"[\u4e00-\u9fff]", caption) and not re.search(r"[A-Za-z]", caption), caption
            for obj in scene.objects:
                pattern = f"{COLOURS_CN[obj.colour]}的?[大小]?{SHAPES_CN[obj.shape]}"
                assert re.search(pattern, caption), (caption, obj)
            mentioned = {colour for colour, word in COLOURS_CN.items() if word in caption}
            assert mentioned == {obj.colour for obj in scene.objects}, caption


def test_background_names_do_not_contain_object_colours() -> None:
    for word in BACKGROUNDS_CN.values():
        assert not any(colour in word for colour in COLOURS_CN.values())


def test_objects_fit_their_cells_without_overlap(toy: dict) -> None:
    for scenes in toy["scenes"].values():
        for scene in scenes:
            for obj in scene.objects:
                assert obj.radius <= obj.cx <= SIZE - obj.radius and obj.radius <= obj.cy <= SIZE - obj.radius
                # The position words come from the cell, so the centre must really be in it.
                assert (int(obj.cy * 3 // SIZE), int(obj.cx * 3 // SIZE)) == divmod(obj.cell, 3)
            for i, a in enumerate(scene.objects):
                for b in scene.objects[i + 1:]:
                    assert math.hypot(a.cx - b.cx, a.cy - b.cy) > a.radius + b.radius
                    assert (a.colour, a.shape) != (b.colour, b.shape)


def test_colours_alone_do_not_identify_an_image() -> None:
    scenes = [sample_scene(np.random.default_rng([0, 0, i]), 64) for i in range(2000)]
    colour_sets = Counter(frozenset(o.colour for o in s.objects) for s in scenes)
    shared = sum(count for count in colour_sets.values() if count > 1)
    assert shared / len(scenes) > 0.95
    # Images sharing a colour set must still differ in what carries those colours.
    contents = {frozenset((o.colour, o.shape) for o in s.objects) for s in scenes}
    assert len(contents) > 2 * len(colour_sets)
    assert set(Counter(len(s.objects) for s in scenes)) == {1, 2, 3}


def test_existing_dataset_is_kept_unless_forced(tmp_path: Path) -> None:
    first = make_toy_dataset(tmp_path, n_train=3, n_val=2, size=32)
    assert first["generated"]
    skipped = make_toy_dataset(tmp_path, n_train=3, n_val=2, size=32)
    assert not skipped["generated"] and skipped["scenes"] == {}
    assert make_toy_dataset(tmp_path, n_train=3, n_val=2, size=32, force=True)["generated"]
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_annotation_means_incomplete(tmp_path: Path) -> None:
    make_toy_dataset(tmp_path, n_train=3, n_val=2, size=32)
    annotation_paths(tmp_path)["en_train"].unlink()  # as if the run died before its last rename
    assert make_toy_dataset(tmp_path, n_train=3, n_val=2, size=32)["generated"]


def test_smaller_set_is_a_prefix_of_a_larger_one(tmp_path: Path) -> None:
    small = make_toy_dataset(tmp_path / "small", n_train=2, n_val=1, size=32)
    large = make_toy_dataset(tmp_path / "large", n_train=4, n_val=1, size=32)
    assert large["scenes"]["train"][:2] == small["scenes"]["train"]
    assert (tmp_path / "small/train/000001.jpg").read_bytes() == (tmp_path / "large/train/000001.jpg").read_bytes()


@pytest.mark.parametrize("kwargs", [{"n_train": -1}, {"n_val": -1}, {"seed": -1}, {"size": 8}])
def test_bad_arguments_are_rejected(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_toy_dataset(tmp_path, **kwargs)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--out", str(tmp_path), "--n-train", "2", "--n-val", "1", "--size", "32", "--seed", "7"])
    assert "wrote 2 train + 1 val" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "en_val.json").read_text(encoding="utf-8"))) == 1
    main(["--out", str(tmp_path)])
    assert "--force" in capsys.readouterr().out
