"""predict.py mode="search": incremental indexing answered exactly, refusal of another model's index and of an
index_dir that holds no index of this project, end to end."""
from __future__ import annotations

import os
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


def test_search_mode_end_to_end_by_text_and_by_example(tmp_path, capsys):
    torch.manual_seed(3)
    weights = tmp_path / "tiny.pth"
    torch.save(build_model(get_config("tiny/VIT-T-8")).state_dict(), weights)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate([(200, 20, 20), (20, 200, 20), (20, 20, 200), (200, 200, 20)]):
        Image.new("RGB", (48, 48), colour).save(photos / f"{i}.png")

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
