"""predict.py mode="search": incremental indexing answered exactly, refusal of another model's index and of an
index_dir that holds no index of this project, end to end."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nets import build_model, get_config
from tests.conftest import run_script
from utils.errors import UserError
from utils.predict.search import SearchIndex

ROOT = Path(__file__).resolve().parents[1]


def _fake_encoder(calls: list):
    """Features from each file's bytes, so a changed file gets a new vector; records what it was asked for."""
    def encode(paths):
        calls.append(sorted(p.name for p in paths))
        rows, failed = [], []
        for path in paths:
            data = path.read_bytes()
            if data.startswith(b"bad"):
                failed.append(path)
                continue
            g = torch.Generator().manual_seed(sum(data) % 10_000)
            rows.append(F.normalize(torch.randn(8, generator=g), dim=0))
        return (torch.stack(rows) if rows else torch.zeros(0, 8)), failed
    return encode


def test_updates_encode_only_new_and_changed_images_and_drop_deleted_ones(tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for name in ("a.jpg", "b.png", "sub/c.jpg"):
        (photos / name).write_bytes(name.encode() * 3)
    (photos / "readme.txt").write_text("not an image")
    calls = []
    index = SearchIndex(tmp_path / "index", "model-1")
    assert index.update(photos, _fake_encoder(calls)) == {"new": 3, "changed": 0, "removed": 0, "kept": 0,
                                                          "unreadable": 0}
    assert calls == [["a.jpg", "b.png", "c.jpg"]]

    reopened = SearchIndex(tmp_path / "index", "model-1")
    assert reopened.paths == ["a.jpg", "b.png", "sub/c.jpg"]
    assert reopened.update(photos, _fake_encoder(calls)) == {"new": 0, "changed": 0, "removed": 0, "kept": 3,
                                                             "unreadable": 0}
    assert len(calls) == 1  # nothing re-encoded

    (photos / "b.png").write_bytes(b"a different picture")
    os.utime(photos / "b.png", ns=(1, 1))
    (photos / "sub" / "c.jpg").unlink()
    (photos / "d.webp").write_bytes(b"new one")
    (photos / "e.jpg").write_bytes(b"bad bytes")
    counts = reopened.update(photos, _fake_encoder(calls))
    assert counts == {"new": 1, "changed": 1, "removed": 1, "kept": 1, "unreadable": 1}
    assert calls[-1] == ["b.png", "d.webp", "e.jpg"]
    assert sorted(reopened.paths) == ["a.jpg", "b.png", "d.webp"]
    # Each image's row is its own file's vector: querying with it finds that image first; and every answer is
    # brute force over the live rows (the removed and changed rows never answer), for any k.
    live = {path: reopened.index.emb.rows_at([reopened.index.emb.starts[reopened.index.emb.names.index(part)] + row])[0]
            for path, (part, row) in zip(reopened.paths, reopened._where)}
    for path, row in live.items():
        assert reopened.query(torch.from_numpy(row), 1)[0][0] == path
    assert sorted(SearchIndex(tmp_path / "index", "model-1").paths) == sorted(live)  # as saved
    g = torch.Generator().manual_seed(0)
    for k in (1, 2, 10):
        vector = F.normalize(torch.randn(8, generator=g), dim=0)
        expected = sorted(((float(torch.from_numpy(v) @ vector), p) for p, v in live.items()), reverse=True)[:k]
        found = reopened.query(vector, k)
        assert [p for p, _ in found] == [p for _, p in expected]
        assert [s for _, s in found] == pytest.approx([s for s, _ in expected], abs=1e-6)

    with pytest.raises(UserError, match="made with other weights or another phi"):
        SearchIndex(tmp_path / "index", "model-2")
    assert SearchIndex(tmp_path / "index", "model-2", rebuild=True).paths == []


def tiny_weights_and_photos(tmp_path: Path, count: int) -> tuple[Path, Path]:
    """Seeded random tiny/VIT-T-8 weights and a folder of `count` (at most 4) one-colour pictures to search."""
    torch.manual_seed(3)
    weights = tmp_path / "tiny.pth"
    torch.save(build_model(get_config("tiny/VIT-T-8")).state_dict(), weights)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate([(200, 20, 20), (20, 200, 20), (20, 20, 200), (200, 200, 20)][:count]):
        Image.new("RGB", (48, 48), colour).save(photos / f"{i}.png")
    return weights, photos


@pytest.mark.slow
def test_search_mode_end_to_end_by_text_and_by_example(tmp_path, capsys):
    weights, photos = tiny_weights_and_photos(tmp_path, 4)

    def run(query: str, model_path=weights, phi="auto") -> tuple[int, str, str]:
        return run_script("predict.py", "--mode", "search", "--model_path", model_path, "--phi", phi,
                          "--dir_origin_path", photos, "--index_dir", tmp_path / "index", "--top_k", 3, "--query",
                          query, capsys=capsys)

    code, out, err = run(str(photos / "2.png"))
    assert code == 0, err[-2000:]
    assert "4 images (4 new, 0 changed re-encoded, 0 removed" in out
    hits = [line.split("  ", 1) for line in out.splitlines()[1:]]
    assert len(hits) == 3 and hits[0][1] == str(photos / "2.png") and float(hits[0][0]) == pytest.approx(1.0, abs=1e-4)
    code, out, _ = run("a red square")
    assert "4 images (0 new, 0 changed re-encoded, 0 removed" in out and len(out.splitlines()) == 4
    code, _, err = run("x", model_path="", phi="tiny/VIT-T-8")
    assert code == 2 and "--rebuild_index true" in err


@pytest.fixture
def folder_search(tiny_weights, tmp_path, capsys):
    """A folder of 3 pictures, and `search(*args)`: predict.py mode search with the tiny weights."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate([(200, 20, 20), (20, 200, 20), (20, 20, 200)]):
        Image.new("RGB", (40, 40), colour).save(photos / f"{i}.png")

    def search(*args, weights=tiny_weights):
        return run_script("predict.py", "--mode", "search", "--model_path", weights, "--phi", "auto", "--Cuda",
                          "false", "--query", "x", "--top_k", 2, *args, capsys=capsys)
    return photos, search


def _one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(n in err for n in needles), err


def test_an_index_dir_holding_no_index_is_refused_unless_a_folder_is_given(folder_search, tmp_path):
    photos, search = folder_search
    # Before: --index_dir of a folder that does not exist built a search of the default img/ there, exit 0.
    code, _, err = search("--index_dir", tmp_path / "nowhere")
    _one_line(code, err, "nowhere does not exist", "--mode index", "--dir_origin_path")
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "empty").mkdir()
    _one_line(*search("--index_dir", tmp_path / "empty")[::2], "empty is empty")
    assert list((tmp_path / "empty").iterdir()) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    _one_line(*search("--index_dir", tmp_path / "mine", "--dir_origin_path", photos)[::2], "not empty and holds no index")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    # Asked for: a folder search is built there.
    code, out, err = search("--index_dir", tmp_path / "nowhere", "--dir_origin_path", photos)
    assert code == 0 and "3 images (3 new" in out, err


@pytest.mark.parametrize("foreign", ["[]", '{"format": "clip-index/9", "embeddings_dir": "."}', "{not json"])
def test_a_foreign_manifest_is_refused_and_kept(folder_search, tmp_path, foreign):
    # Before: valid JSON that is not this project's manifest counted as "no index" and was overwritten.
    photos, search = folder_search
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "index.json").write_text(foreign)
    for extra in ([], ["--dir_origin_path", photos], ["--dir_origin_path", photos, "--rebuild_index", "true"]):
        code, _, err = search("--index_dir", tmp_path / "index", *extra)
        _one_line(code, err, "index.json")
        assert "newer than this version reads" in err if "/9" in foreign else True
        assert (tmp_path / "index" / "index.json").read_text() == foreign
        assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["index.json"]


def test_a_folder_search_is_searched_as_given_and_kept_to_its_folder(folder_search, tmp_path):
    photos, search = folder_search
    code, out, err = search("--index_dir", tmp_path / "index", "--dir_origin_path", photos)
    assert code == 0 and "3 images (3 new" in out, err
    # index_dir alone: its own folder, updated (before: the default img/ was indexed in its place).
    code, out, err = search("--index_dir", tmp_path / "index")
    assert code == 0 and "3 images (0 new, 0 changed re-encoded, 0 removed" in out, err
    assert all(line.split("  ", 1)[1].startswith(str(photos.resolve())) for line in out.splitlines()[1:])
    other = tmp_path / "other"
    shutil.copytree(photos, other)
    _one_line(*search("--index_dir", tmp_path / "index", "--dir_origin_path", other)[::2], "is the folder search of",
              "--rebuild_index true")
    code, out, err = search("--index_dir", tmp_path / "index", "--dir_origin_path", other, "--rebuild_index", "true")
    assert code == 0 and "3 images (3 new" in out, err


def test_the_web_page_refuses_an_index_dir_without_an_index_before_the_model_loads(tmp_path):
    from utils.predict.inputs import search_inputs

    config = {"mode": "web", "index_dir": str(tmp_path / "nowhere"), "dir_origin_path": "img/", "rebuild_index": False}
    with pytest.raises(UserError, match="holds no index to search"):
        search_inputs(config, explicit={"index_dir": config["index_dir"]})
    # Without index_dir the page indexes dir_origin_path in its default folder, or starts with no search tab.
    assert search_inputs({**config, "index_dir": ""}, explicit={})["index_dir"].startswith("logs")


def test_a_damaged_folder_search_names_the_file_and_the_rebuild(folder_search, tmp_path):
    photos, search = folder_search
    assert search("--index_dir", tmp_path / "index", "--dir_origin_path", photos)[0] == 0
    [vectors] = (tmp_path / "index" / "img_emb").glob("*.npy")
    vectors.write_bytes(vectors.read_bytes()[:-100])
    _one_line(*search("--index_dir", tmp_path / "index", "--dir_origin_path", photos)[::2],
              f"{vectors.name} is truncated", "--rebuild_index true")
    code, out, err = search("--index_dir", tmp_path / "index", "--dir_origin_path", photos, "--rebuild_index", "true")
    assert code == 0 and "3 images (3 new" in out, err


def test_the_weights_identity_is_their_content_not_their_name(folder_search, tiny_weights, tmp_path):
    from utils.eval.feature_cache import cache_key
    from utils.eval.feature_cache import model_identity

    photos, search = folder_search
    copy = tmp_path / "renamed.pth"
    shutil.copyfile(tiny_weights, copy)
    assert model_identity(str(copy), "tiny/VIT-T-8") == model_identity(str(tiny_weights), "tiny/VIT-T-8")
    assert model_identity(str(copy), "tiny/VIT-T-8") != model_identity(str(copy), "tiny/VIT-T-16")
    entries = [{"image": "0.png"}]
    assert cache_key(copy, "p", None, photos, entries, {}) == cache_key(tiny_weights, "p", None, photos, entries, {})
    assert search("--index_dir", tmp_path / "index", "--dir_origin_path", photos)[0] == 0
    code, out, err = search("--index_dir", tmp_path / "index", weights=copy)  # before: "other weights"
    assert code == 0 and "0 new" in out, err
    changed = tmp_path / "changed.pth"
    changed.write_bytes(copy.read_bytes()[:-1] + bytes([copy.read_bytes()[-1] ^ 1]))
    assert model_identity(str(changed), "tiny/VIT-T-8") != model_identity(str(copy), "tiny/VIT-T-8")


def test_an_earlier_format_is_refused_until_rebuilt(folder_search, tmp_path):
    photos, search = folder_search
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "index.json").write_text('{"format": "clip-index/1", "embeddings_dir": ".", "parts": []}')
    _one_line(*search("--index_dir", tmp_path / "index", "--dir_origin_path", photos)[::2], "earlier version",
              "--rebuild_index true")
    code, out, err = search("--index_dir", tmp_path / "index", "--dir_origin_path", photos, "--rebuild_index", "true")
    assert code == 0 and "3 images (3 new" in out, err
