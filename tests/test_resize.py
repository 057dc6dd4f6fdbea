"""convert.py --resize: short side N, upright, aspect kept, never upscaled; JSON and shards; reruns resume."""
from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from tests.test_convert import DEFAULTS
from utils.data.sources.pipeline import convert


def _photo(path: Path, size: tuple[int, int], orientation: int = 1, fmt: str = "JPEG") -> Path:
    """Left half red, right half blue as stored; EXIF `orientation` says how to turn it upright."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:, : size[0] // 2] = (220, 20, 20)
    pixels[:, size[0] // 2:] = (20, 20, 220)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, fmt, **({"exif": exif.tobytes(), "quality": 95} if fmt == "JPEG" else {}))
    path.with_suffix(".txt").write_text(f"a picture called {path.stem}")
    return path


def _folder(tmp_path: Path) -> Path:
    source = tmp_path / "photos"
    _photo(source / "wide.jpg", (1201, 801))
    _photo(source / "deep" / "tall.jpg", (601, 1003))
    _photo(source / "small.jpg", (200, 120))
    _photo(source / "turned.jpg", (1000, 600), orientation=6)  # upright it is 600 wide, 1000 tall
    _photo(source / "flat.png", (900, 300), fmt="PNG")
    return source


def _run(source: Path, out: Path, **extra) -> None:
    convert({**DEFAULTS, "source": "folder", "input": str(source), "output_dir": str(out), "name": "set",
             "resize": 256, "jpeg_quality": 90, "num_workers": 2, **extra})


def test_resize_writes_short_side_n_upright_never_upscaled_and_says_how_much_smaller(tmp_path, capsys):
    out = tmp_path / "out"
    _run(_folder(tmp_path), out)
    entries = json.loads((out / "set_train.json").read_text())
    sizes = {Path(e["image"]).name: Image.open(out / e["image"]).size for e in entries}
    assert all(e["image"].startswith("set_256px/") for e in entries)
    assert sizes == {"wide.jpg": (384, 256), "tall.jpg": (256, 427), "small.jpg": (200, 120),
                     "turned.jpg": (256, 427), "flat.png.jpg": (768, 256)}
    with Image.open(out / "set_256px" / "turned.jpg") as turned:
        # Stored left red / right blue, turned 90 degrees clockwise: upright the top is red, the bottom blue.
        top, bottom = turned.getpixel((128, 10)), turned.getpixel((128, 416))
        assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]
        assert turned.getexif().get(0x0112, 1) == 1
    assert Image.open(out / "set_256px" / "flat.png.jpg").format == "JPEG"
    printed = capsys.readouterr().out
    assert "resized 5 images to short side 256" in printed and "4 written" in printed and "1 small enough, copied" in printed
    assert "smaller (" in printed


def test_a_rerun_keeps_intact_copies_and_remakes_damaged_or_missing_ones(tmp_path, capsys):
    source, out = _folder(tmp_path), tmp_path / "out"
    _run(source, out)
    copies = out / "set_256px"
    kept = copies / "wide.jpg"
    os.utime(kept, (1, 1))  # a rewrite would change it
    damaged = copies / "deep" / "tall.jpg"
    damaged.write_bytes(damaged.read_bytes()[:300])
    (copies / "turned.jpg").unlink()
    capsys.readouterr()
    _run(source, out, overwrite=True)
    printed = capsys.readouterr().out
    assert "2 written, 3 already there and intact" in printed
    assert kept.stat().st_mtime == 1
    assert Image.open(damaged).size == (256, 427) and Image.open(copies / "turned.jpg").size == (256, 427)
    assert "MiB smaller" in printed or "KiB smaller" in printed


def test_resize_feeds_webdataset_shards(tmp_path):
    out = tmp_path / "out"
    _run(_folder(tmp_path), out, to="wds", shard_size=10)
    with tarfile.open(out / "set_train" / "00000.tar") as tar:
        images = [m for m in tar.getmembers() if m.name.endswith(".jpg")]
        sizes = sorted(Image.open(tar.extractfile(m)).size for m in images)
    assert sizes == [(200, 120), (256, 427), (256, 427), (384, 256), (768, 256)]
