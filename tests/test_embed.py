"""predict.py mode="embed": 2 gloo processes equal one, kill -9 then rerun equals one run, clip-retrieval's layout."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from utils.data.toy import make_toy_dataset
from tests.conftest import free_port, run_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A toy caption set (10 images x 5 captions), a folder of its images plus one unreadable file."""
    root = tmp_path_factory.mktemp("embed")
    make_toy_dataset(root / "toy", n_train=10, n_val=2, seed=2)
    folder = root / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, path in enumerate(sorted((root / "toy" / "train").glob("*.jpg"))[:7]):
        (folder / ("sub" if i % 3 == 0 else "") / path.name).write_bytes(path.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a picture")
    return root


def embed_args(weights, source: dict, out: Path, **extra) -> list:
    args = dict(mode="embed", model_path=weights, phi="auto", embeddings_dir=out, part_size=3, batch_size=2,
                num_workers=0, Cuda="false", **source, **extra)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def sources(data: Path) -> dict[str, dict]:
    return {"folder": {"dir_origin_path": data / "photos"},
            "captions": {"caption_file": data / "toy" / "en_train.json"}}


@pytest.fixture(scope="module")
def single(data, tiny_weights, tmp_path_factory):
    """Each source embedded by one process (one torch thread, as the subprocesses below run)."""
    out = tmp_path_factory.mktemp("single")
    results = {}
    for name, source in sources(data).items():
        results[name] = run_script("predict.py", *embed_args(tiny_weights, source, out / name), threads=1)
        assert results[name].returncode == 0, results[name].stderr[-3000:]
    return out, results


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read(folder: Path) -> tuple[np.ndarray, np.ndarray | None, list[dict]]:
    """(image rows, caption rows or None, metadata rows) of an embeddings folder, parts in name order."""
    names = sorted(p.name[len("img_emb_"):-4] for p in (folder / "img_emb").glob("*.npy"))
    images = np.concatenate([np.load(folder / "img_emb" / f"img_emb_{n}.npy") for n in names])
    texts = None
    if (folder / "text_emb").is_dir():
        texts = np.concatenate([np.load(folder / "text_emb" / f"text_emb_{n}.npy") for n in names])
    rows = [r for n in names for r in pq.read_table(folder / "metadata" / f"metadata_{n}.parquet").to_pylist()]
    return images, texts, rows


def _gloo_rank(rank: int, world: int, ports: list[int], jobs: list[list[str]], codes) -> None:
    for j, (args, port) in enumerate(zip(jobs, ports)):
        # torchrun's environment: predict.py --distributed true joins the group through it, as under torchrun.
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        result = run_script("predict.py", *args, threads=1)
        codes[rank * len(jobs) + j] = result.returncode
        if result.returncode:
            print(f"rank {rank}, {args[-1]}: {result.stderr[-3000:]}", file=sys.stderr, flush=True)


@pytest.mark.slow
def test_two_gloo_processes_embed_each_item_once_equal_to_one_process(data, tiny_weights, single, tmp_path):
    out, results = single
    jobs = [embed_args(tiny_weights, source, tmp_path / name, distributed="true")
            for name, source in sources(data).items()]
    codes = mp.get_context("spawn").Array("i", [-1] * 4)
    # A port per job: the first group's store may still hold its port when the second one starts.
    processes = mp.spawn(_gloo_rank, args=(2, [free_port(), free_port()], jobs, codes), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not processes.join(timeout=5):
        if time.monotonic() > deadline:  # a rank stuck at a collective: fail, do not hang the suite
            for process in processes.processes:
                process.kill()
            pytest.fail("the two gloo processes did not finish within 300 s")
    assert list(codes) == [0, 0, 0, 0]
    for name in sources(data):
        one, two = read(out / name), read(tmp_path / name)
        assert two[2] == one[2]  # the same rows, in the same order
        assert np.array_equal(two[0], one[0]) and (one[1] is None or np.array_equal(two[1], one[1]))
    # Every image exactly once: the folder's 7 readable images one row each, the broken one listed and skipped.
    photos = sorted(str(p) for p in (data / "photos").rglob("*.jpg") if p.name != "broken.jpg")
    assert sorted(r["image_path"] for r in read(tmp_path / "folder")[2]) == photos
    assert f"skipped {data / 'photos' / 'broken.jpg'}: UnidentifiedImageError" in results["folder"].stdout
    # The caption file: a row per (image, caption) pair, each pair once.
    entries = json.loads((data / "toy" / "en_train.json").read_text())
    pairs = sorted((str(data / "toy" / e["image"]), c) for e in entries for c in e["caption"])
    assert sorted((r["image_path"], r["caption"]) for r in read(tmp_path / "captions")[2]) == pairs


def test_features_equal_detect_image_for_eval_within_float16_rounding(data, tiny_weights, single):
    from clip import CLIP
    from utils.data.images import open_rgb

    out, _ = single
    images, texts, rows = read(out / "captions")
    model = CLIP(model_path=str(tiny_weights), phi="auto", cuda=False)
    first = {}
    for i, row in enumerate(rows):
        first.setdefault(row["image_path"], i)
    paths = list(first)
    expected_images, expected_texts = model.detect_image_for_eval(images=[open_rgb(p) for p in paths],
                                                                  texts=[r["caption"] for r in rows])
    expected_images = F.normalize(expected_images.float(), dim=-1).numpy()
    expected_texts = F.normalize(expected_texts.float(), dim=-1).numpy()
    # float16 keeps 11 significant bits: a unit vector's entries are off by at most 2**-11 ~ 4.9e-4.
    for i, row in enumerate(rows):  # an image's caption rows all hold its one vector
        assert np.abs(images[i].astype(np.float32) - expected_images[paths.index(row["image_path"])]).max() <= 5e-4
    assert np.abs(texts.astype(np.float32) - expected_texts).max() <= 5e-4


_KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import utils.predict.embed as embed
import utils.predict.embeddings as embeddings
calls = [0]
write = embed.atomic_write_bytes
def dying_write(data, path):
    calls[0] += 1
    if calls[0] == {kill_at}:  # embed.json, part 0's three files, part 1's image file: then kill -9
        os.kill(os.getpid(), signal.SIGKILL)
    write(data, path)
embed.atomic_write_bytes = embeddings.atomic_write_bytes = dying_write
from utils.config import run_script
import predict
run_script(vars(predict), predict.main, {args!r})
"""


@pytest.mark.slow
def test_kill_9_mid_part_then_rerun_ends_identical_to_an_uninterrupted_run(data, tiny_weights, single, tmp_path):
    out, _ = single
    args = [str(a) for a in embed_args(tiny_weights, sources(data)["captions"], tmp_path / "e")]
    killed = subprocess.run([sys.executable, "-c", _KILLER.format(root=str(ROOT), kill_at=6, args=args)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    left = set(files(tmp_path / "e"))
    assert {"metadata/metadata_0.parquet", "img_emb/img_emb_1.npy"} <= left
    assert "metadata/metadata_1.parquet" not in left and "text_emb/text_emb_1.npy" not in left
    assert not [name for name in left if name.split("/")[-1].startswith(".")]  # no temporary file left visible
    rerun = run_script("predict.py", *args, threads=1)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 done by an earlier run, skipped" in rerun.stdout
    assert files(tmp_path / "e") == files(out / "captions")  # byte for byte


def _write_shards(folder: Path, toy: Path) -> list[str]:
    folder.mkdir()
    entries = json.loads((toy / "en_train.json").read_text())
    keys = []
    for shard in range(2):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for entry in entries[shard * 3:shard * 3 + 3]:
                key = f"{shard:05d}{len(keys):04d}"
                keys.append(key)
                for suffix, data in (("jpg", (toy / entry["image"]).read_bytes()),
                                     ("txt", entry["caption"][0].encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return keys


def test_layout_is_clip_retrievals_field_by_field(data, tiny_weights, single, tmp_path):
    """clip-retrieval's inference writes img_emb/img_emb_{part}.npy (float16 unit rows), text_emb/text_emb_{part}.npy
    and metadata/metadata_{part}.parquet with `image_path` and `caption` (webdataset: image_path is the sample's
    key), part numbers zero-padded to the width of the part count; row i of each file is one sample."""
    out, _ = single
    keys = _write_shards(tmp_path / "shards", data / "toy")
    result = run_script("predict.py", *embed_args(tiny_weights, {"caption_file": tmp_path / "shards"},
                                                  tmp_path / "wds", embed_dtype="float32"))
    assert result.returncode == 0, result.stderr[-3000:]
    for name, columns, parts, dtype in (("captions", ["image_path", "caption"], 4, np.float16),
                                        ("folder", ["image_path"], 3, np.float16),
                                        ("wds", ["image_path", "caption", "shard"], 2, np.float32)):
        folder = out / name if name != "wds" else tmp_path / "wds"
        subfolders = {"img_emb", "metadata"} | ({"text_emb"} if "caption" in columns else set())
        assert {p.name for p in folder.iterdir() if p.is_dir()} == subfolders
        width = len(str(parts))
        for sub, suffix in (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet")):
            if sub in subfolders:
                assert sorted(p.name for p in (folder / sub).iterdir()) == \
                    [f"{sub}_{str(i).zfill(width)}.{suffix}" for i in range(parts)]
        for i in range(parts):
            part = str(i).zfill(width)
            image = np.load(folder / "img_emb" / f"img_emb_{part}.npy")
            table = pq.read_table(folder / "metadata" / f"metadata_{part}.parquet")
            assert image.dtype == dtype and image.ndim == 2 and image.shape == (table.num_rows, 128)
            assert np.allclose(np.linalg.norm(image.astype(np.float32), axis=1), 1, atol=2e-3)
            assert table.column_names == columns and all(str(t) == "string" for t in table.schema.types)
            if "caption" in columns:
                text = np.load(folder / "text_emb" / f"text_emb_{part}.npy")
                assert text.dtype == dtype and text.shape == image.shape
    wds = read(tmp_path / "wds")[2]
    assert [r["image_path"] for r in wds] == keys and {r["shard"] for r in wds} == \
        {str(tmp_path / "shards" / f"{s:05d}.tar") for s in range(2)}


def test_autofaiss_embedding_reader_reads_the_folder(single):
    reader_module = pytest.importorskip("embedding_reader")
    out, _ = single
    images, _, rows = read(out / "captions")
    reader = reader_module.EmbeddingReader(str(out / "captions" / "img_emb"), file_format="parquet_npy",
                                           embedding_column="embedding", meta_columns=["image_path", "caption"],
                                           metadata_folder=str(out / "captions" / "metadata"))
    assert reader.count == len(rows) and reader.dimension == images.shape[1]
    got, meta = zip(*reader(batch_size=1000, start=0, end=reader.count, show_progress=False))
    assert np.array_equal(np.concatenate(got), images)
    frame = meta[0]
    assert [frame["image_path"][i] for i in range(len(frame))] == [r["image_path"] for r in rows]


def test_bad_input_is_one_line_before_any_work(data, tiny_weights, single, tmp_path):
    out, _ = single
    for source, needle in (({"caption_file": tmp_path / "missing.json"}, "caption_file"),
                           ({"dir_origin_path": tmp_path / "nowhere"}, "is not a folder"),
                           ({"dir_origin_path": data / "photos", "embeddings_dir": out / "captions"},
                            "holds the embeddings of another job")):
        extra = {k: v for k, v in source.items() if k == "embeddings_dir"}
        source = {k: v for k, v in source.items() if k != "embeddings_dir"}
        result = run_script("predict.py", *embed_args(tiny_weights, source, extra.get("embeddings_dir", tmp_path / "o")))
        assert result.returncode == 2 and needle in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    before = files(out / "folder")
    result = run_script("predict.py", "--mode", "search", "--model_path", tiny_weights, "--phi", "auto", "--Cuda",
                        "false", "--dir_origin_path", data / "photos", "--index_dir", out / "folder", "--query", "x")
    assert result.returncode == 2 and 'written by mode "embed"' in result.stderr
    assert files(out / "folder") == before  # a folder search never takes embed's output as its own index


def test_search_answers_from_a_built_index(data, tiny_weights, single, tmp_path, capsys):
    from clip import CLIP

    out, _ = single
    code, built, err = run_script("predict.py", "--mode", "index", "--embeddings_dir", out / "captions",
                                  "--index_dir", tmp_path / "index", capsys=capsys)
    assert code == 0 and "Flat, 10 vectors" in built, err
    assert "recall@10 1.000 on 10 image queries and 1.000 on 50 text queries" in built  # the captions as queries
    code, found, err = run_script("predict.py", "--mode", "search", "--index_dir", tmp_path / "index", "--model_path",
                                  tiny_weights, "--phi", "auto", "--query", "a red circle", "--top_k", "3",
                                  "--Cuda", "false", capsys=capsys)
    assert code == 0, err
    lines = found.splitlines()
    assert lines[0].startswith(f"index {tmp_path / 'index'}: 10 images (Flat over")
    images, _, rows = read(out / "captions")
    first = sorted({r["image_path"]: i for i, r in reversed(list(enumerate(rows)))}.items(), key=lambda kv: kv[1])
    model = CLIP(model_path=str(tiny_weights), phi="auto", cuda=False)
    text = F.normalize(model.detect_image_for_eval(texts=["a red circle"])[1].float(), dim=-1)[0].numpy()
    scores = np.array([images[i].astype(np.float32) @ text for _, i in first])
    expected = [first[i][0] for i in np.argsort(-scores)[:3]]
    assert [line.split("  ", 1)[1] for line in lines[1:]] == expected
    # Weights other than the embeddings' are refused rather than answered with nonsense.
    other = tmp_path / "other.pth"
    torch.save({k: v + 1e-3 for k, v in torch.load(tiny_weights, weights_only=True).items()}, other)
    code, _, err = run_script("predict.py", "--mode", "search", "--index_dir", tmp_path / "index", "--model_path",
                              other, "--phi", "auto", "--query", "x", "--Cuda", "false", capsys=capsys)
    assert code == 2 and "other weights" in err


def test_index_without_index_dir_is_refused_and_borrows_no_folder_search_index(single, tmp_path, capsys, monkeypatch):
    # The folder search's default index_dir (logs/search_index/<folder>_<hash>) is not a place to build into:
    # that folder's search would then answer from the built index.
    monkeypatch.chdir(tmp_path)
    out, _ = single
    code, _, err = run_script("predict.py", "--mode", "index", "--embeddings_dir", out / "captions", capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--index_dir" in err, err
    assert not (tmp_path / "logs").exists()


def test_an_index_of_embeddings_without_captions_is_tuned_on_prompts_by_their_own_weights(single, tiny_weights, tmp_path,
                                                                                          capsys):
    import shutil

    out, _ = single
    emb = tmp_path / "emb"
    shutil.copytree(out / "folder", emb)
    manifest = json.loads((emb / "embed.json").read_text())
    assert manifest["model_path"] == str(tiny_weights.resolve())  # where mode index finds the weights again
    index = ("predict.py", "--mode", "index", "--embeddings_dir", emb, "--index_type", "IVF2,Flat", "--Cuda", "false")
    code, built, err = run_script(*index, "--index_dir", tmp_path / "a", capsys=capsys)
    assert code == 0, err
    assert "text queries: 1000 prompts over common object names" in built and "on 1000 text queries" in built
    report = json.loads((tmp_path / "a" / "index.json").read_text())["report"]
    assert set(report["recall_at_10"]) == {"image", "text"} and report["queries"]["text"] == 1000
    # The recorded weights gone: model_path is used, when its bytes are the embeddings' weights (any file name).
    (emb / "embed.json").write_text(json.dumps({**manifest, "model_path": str(tmp_path / "moved.pth")}))
    copy = tmp_path / "copy.pth"
    shutil.copyfile(tiny_weights, copy)
    code, _, err = run_script(*index, "--index_dir", tmp_path / "b", "--model_path", copy, "--phi", "auto",
                              capsys=capsys)
    assert code == 0, err
    other = tmp_path / "other.pth"
    torch.save({k: v + 1e-3 for k, v in torch.load(tiny_weights, weights_only=True).items()}, other)
    code, _, err = run_script(*index, "--index_dir", tmp_path / "c", "--model_path", other, "--phi", "auto",
                              capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "made with other weights" in err, err
    assert not (tmp_path / "c").exists()
