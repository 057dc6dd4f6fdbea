"""convert.py --resize: short side N, upright, aspect kept, never upscaled; JSON and shards; reruns resume."""
from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
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


def test_a_copy_is_remade_when_its_source_or_the_settings_change(tmp_path, capsys):
    """Each copy records what it was made from; today an edited same-size photo, or another jpeg_quality, was
    "already there and intact" even with --overwrite true."""
    source, out = _folder(tmp_path), tmp_path / "out"
    _run(source, out)
    copies = out / "set_256px"
    edited = source / "wide.jpg"
    before = copies / "wide.jpg"
    old_pixel = Image.open(before).getpixel((10, 10))
    Image.new("RGB", (1201, 801), (20, 200, 20)).save(edited, quality=95)  # same size, green now
    capsys.readouterr()
    _run(source, out, overwrite=True)
    printed = capsys.readouterr().out
    assert "0 written, 4 already there and intact, 0 small enough, copied, 1 remade (their source" in printed, printed
    new_pixel = Image.open(before).getpixel((10, 10))
    assert old_pixel[0] > 150 and new_pixel[1] > 150 > new_pixel[0], (old_pixel, new_pixel)

    _run(source, out, overwrite=True, jpeg_quality=40)
    printed = capsys.readouterr().out
    # The four re-encoded copies are remade at quality 40; the small JPEG is copied as it is, now recorded so.
    assert "0 written, 0 already there and intact, 1 small enough, copied, 4 remade" in printed, printed
    from utils.data.sources.resize import read_record

    assert read_record(copies / "deep" / "tall.jpg")["jpeg_quality"] == 40
    assert read_record(copies / "small.jpg") == {"v": 1, "source_bytes": (source / "small.jpg").stat().st_size,
                                                 "source_mtime_ns": (source / "small.jpg").stat().st_mtime_ns,
                                                 "short_side": 256, "jpeg_quality": 40}
    # The record is a comment: the copy decodes as before and a plain JPEG copy keeps its pixels exactly.
    assert np.array_equal(np.asarray(Image.open(copies / "small.jpg")), np.asarray(Image.open(source / "small.jpg")))
    _run(source, out, overwrite=True, jpeg_quality=40)
    assert "0 written, 5 already there and intact, 0 small enough, copied)" in capsys.readouterr().out


@pytest.mark.slow
def test_ctrl_c_stops_the_workers_with_one_line(tmp_path):
    """Today each worker prints its own KeyboardInterrupt traceback (35 lines each)."""
    import signal
    import subprocess
    import sys
    import time

    source = tmp_path / "many"
    source.mkdir()
    one = _photo(source / "000.png", (1600, 1200), fmt="PNG")  # PNG: decoded in full, so there is work to stop
    for i in range(1, 400):
        shutil.copyfile(one, source / f"{i:03d}.png")
        shutil.copyfile(one.with_suffix(".txt"), source / f"{i:03d}.txt")
    root = Path(__file__).resolve().parents[1]
    # Twice, each the moment the progress bar appears: workers still starting or waiting for work are where the
    # old tracebacks came from (and where a run sometimes went on to the end), so one try may miss it.
    for attempt in range(2):
        out = tmp_path / f"out{attempt}"
        process = subprocess.Popen([sys.executable, str(root / "datasets" / "convert.py"), "--source", "folder",
                                    "--input", str(source), "--output_dir", str(out), "--name", "set", "--resize",
                                    "64", "--num_workers", "4"], cwd=root, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True)
        err = b""
        while b"resizing to" not in err and process.poll() is None:
            err += os.read(process.stderr.fileno(), 1)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group gets it
        _, rest = process.communicate(timeout=120)
        err = (err + rest).decode()
        assert process.returncode == 130, err
        lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "resizing to" not in line]
        assert lines == ["interrupted"], err
        assert len(list((out / "set_64px").glob("*.jpg"))) < 400  # it did stop
        assert not list((out / "set_64px").glob("*.tmp*"))  # nothing half-written left
