"""datasets/curate.py: the kept set is the scores' verdict, near-duplicates and train/val leaks are found,
outputs are never replaced unasked, and bad input is refused before the model loads."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from utils.data.toy import make_toy_dataset
from tests.conftest import run_script
from utils.errors import UserError
from utils.eval.curate import duplicate_groups, nearest
from utils.data.preflight import read_annotations

COPY, ORIGINAL = "train/copy.jpg", "train/000002.jpg"  # an exact copy in the training set
RESIZED, LEAKED = "val/resized.jpg", "train/000004.jpg"  # a val image that is the train image at 0.8x


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_weights):
    """A toy root with train.json (8 images and an exact copy of one) and val.json (3 images and a 0.8x copy of
    a train image), and every image's and caption's features straight from CLIP.detect_image_for_eval."""
    from clip import CLIP

    root = tmp_path_factory.mktemp("curate")
    toy = make_toy_dataset(root, n_train=8, n_val=3, seed=5)
    train = json.loads(toy["files"]["en_train"].read_text())
    val = json.loads(toy["files"]["en_val"].read_text())
    shutil.copyfile(root / ORIGINAL, root / COPY)
    train.append({"image": COPY, "caption": train[6]["caption"][:2]})
    with Image.open(root / LEAKED) as image:
        image.resize((round(image.width * 0.8), round(image.height * 0.8)), Image.BICUBIC).save(root / RESIZED)
    val.append({"image": RESIZED, "caption": ["a copy"]})
    (root / "train.json").write_text(json.dumps(train))
    (root / "val.json").write_text(json.dumps(val))

    clip = CLIP(model_path=str(tiny_weights), phi="tiny/VIT-T-8", cuda=False)

    def encode(entries):
        images, scores = [], []
        for entry in entries:
            with Image.open(root / entry["image"]) as image:
                image_features, text_features = clip.detect_image_for_eval([image], entry["caption"])
            image_features = F.normalize(image_features.float(), dim=-1)
            images.append(image_features[0])
            scores.append((F.normalize(text_features.float(), dim=-1) @ image_features[0]).tolist())
        return torch.stack(images), scores

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script runs below: on a busy machine more threads only contend
    try:
        train_images, train_scores = encode(train)
        val_images, _ = encode(val)
    finally:
        torch.set_num_threads(threads)
    return dict(root=root, train=train, val=val, images=train_images, scores=train_scores, val_images=val_images)


def curate(data, output: Path, *extra, model_path=None):
    return run_script("datasets/curate.py", "--datasets_path", data["root"], "--input", data["root"] / "train.json",
                      "--output", output, "--model_path", model_path or data["weights"], "--phi", "tiny/VIT-T-8",
                      "--num_workers", "0", "--batch_size", "4", "--Cuda", "false", *extra, threads=1)


@pytest.fixture
def run(data, tiny_weights):
    return lambda *args, **kwargs: curate({**data, "weights": tiny_weights}, *args, **kwargs)


def _between(low: float, high: float, what: str) -> float:
    """A threshold halfway between two measured similarities, which must be told apart with room to spare."""
    assert high - low > 1e-4, f"{what}: {low} and {high} are too close to put a threshold between"
    return (low + high) / 2


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))


def test_kept_set_equals_the_scores_computed_directly(data, run, tmp_path):
    # Between the lowest and the second lowest best caption of an image: exactly one image loses every caption.
    best = sorted(max(s) for s in data["scores"])
    threshold = _between(best[0], best[1], "best captions")
    expected = [{"image": e["image"], "caption": [c for c, s in zip(e["caption"], scores) if s >= threshold]}
                for e, scores in zip(data["train"], data["scores"])]
    expected = [e for e in expected if e["caption"]]
    assert len(expected) == len(data["train"]) - 1
    assert any(0 < len(e["caption"]) < len(full["caption"]) for e in expected for full in data["train"]
               if full["image"] == e["image"]), "no image keeps only some captions: the threshold tests too little"

    result = run(tmp_path / "kept.json", "--min_clip_score", threshold, "--duplicates", "off")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "kept.json").read_text()) == expected
    rows = _rows(tmp_path / "kept_scores.csv")
    direct = [(e["image"], c, s)
              for e, scores in zip(data["train"], data["scores"]) for c, s in zip(e["caption"], scores)]
    assert [(r["image"], r["caption"]) for r in rows] == [(image, c) for image, c, _ in direct]
    for row, (_, _, score) in zip(rows, direct):
        assert float(row["score"]) == pytest.approx(score, abs=1e-5)
        assert row["kept"] == str(score >= threshold).lower()
    assert (tmp_path / "kept_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "kept_duplicates.json").exists() and not (tmp_path / "kept_leakage.csv").exists()
    kept_captions = sum(len(e["caption"]) for e in expected)
    assert f"{len(direct)} captions of {len(data['train'])} images; {kept_captions} score at least" in result.stdout
    assert f"kept {kept_captions} captions of {len(expected)} images" in result.stdout


def test_an_exact_copy_forms_one_group_and_only_the_first_is_kept(data, run, tmp_path):
    images = data["images"]
    copy, original = (next(i for i, e in enumerate(data["train"]) if e["image"] == name) for name in (COPY, ORIGINAL))
    similarity = images @ images.T
    others = similarity.clone()
    others.fill_diagonal_(-2)
    others[copy, original] = others[original, copy] = -2
    threshold = _between(others.max().item(), similarity[copy, original].item(), "copy vs other images")

    result = run(tmp_path / "kept.json", "--min_clip_score", -1, "--dup_threshold", threshold)
    assert result.returncode == 0, result.stderr
    groups = json.loads((tmp_path / "kept_duplicates.json").read_text())
    assert [[(m["image"], m["kept"]) for m in g] for g in groups] == [[(ORIGINAL, True), (COPY, False)]]
    assert groups[0][1]["similarity"] == pytest.approx(1, abs=1e-5)
    kept = json.loads((tmp_path / "kept.json").read_text())
    assert [e["image"] for e in kept] == [e["image"] for e in data["train"] if e["image"] != COPY]
    dropped = {r["dropped_because"] for r in _rows(tmp_path / "kept_scores.csv") if r["image"] == COPY}
    assert dropped == {f"duplicate of {ORIGINAL}"}
    # duplicates=list names the same group and keeps every image.
    result = run(tmp_path / "all.json", "--min_clip_score", -1, "--dup_threshold", threshold, "--duplicates", "list")
    listed = json.loads((tmp_path / "all_duplicates.json").read_text())
    assert [[(m["image"], m["kept"]) for m in g] for g in listed] == [[(ORIGINAL, True), (COPY, True)]]
    assert len(json.loads((tmp_path / "all.json").read_text())) == len(data["train"])


def test_a_val_image_resized_from_a_train_image_is_listed_as_leakage(data, run, tmp_path):
    val, train = data["val_images"], data["images"]
    resized = next(i for i, e in enumerate(data["val"]) if e["image"] == RESIZED)
    leaked = next(i for i, e in enumerate(data["train"]) if e["image"] == LEAKED)
    similarity = val @ train.T
    copy_similarity = similarity[resized, leaked].item()
    similarity[resized, leaked] = -2
    # The resized copy is detected by its similarity, not by a threshold that lets everything through.
    threshold = _between(similarity.max().item(), copy_similarity, "resized copy vs other pairs")

    # The val set in a folder of its own (against_datasets_path), as a separate download would be: its paths
    # exist only there.
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(data["root"] / "val", elsewhere / "held_out")
    (elsewhere / "val.json").write_text(json.dumps([{**e, "image": e["image"].replace("val/", "held_out/")}
                                                    for e in data["val"]]))
    result = run(tmp_path / "kept.json", "--min_clip_score", -1, "--dup_threshold", threshold,
                 "--against", elsewhere / "val.json", "--against_datasets_path", elsewhere)
    assert result.returncode == 0, result.stderr
    rows = _rows(tmp_path / "kept_leakage.csv")
    assert [(r["against_image"], r["input_image"]) for r in rows] == [(RESIZED.replace("val/", "held_out/"), LEAKED)]
    assert float(rows[0]["similarity"]) == pytest.approx(copy_similarity, abs=1e-5)
    assert f"leakage: 1 of {len(data['val'])} images of" in result.stdout


def test_caption_files_in_other_formats_are_read_and_written(data, run, tmp_path):
    table = tmp_path / "train.csv"
    with table.open("w", newline="") as f:
        csv.writer(f).writerows([("filepath", "title"),
                                 *((e["image"], c) for e in data["train"] for c in e["caption"])])
    result = run(tmp_path / "kept.tsv", "--input", table, "--min_clip_score", -1, "--duplicates", "off")
    assert result.returncode == 0, result.stderr
    assert read_annotations(tmp_path / "kept.tsv") == data["train"]


def test_existing_outputs_are_refused_before_any_work(run, tmp_path):
    (tmp_path / "kept_scores.csv").write_text("mine")
    # A model that cannot load shows that the refusal comes first.
    result = run(tmp_path / "kept.json", model_path=tmp_path / "missing.pth")
    assert result.returncode == 2
    assert "kept_scores.csv already exists" in result.stderr and "--overwrite true" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "kept_scores.csv").read_text() == "mine" and not (tmp_path / "kept.json").exists()
    result = run(tmp_path / "kept.json", "--overwrite", "true", "--duplicates", "off")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "kept_scores.csv").read_text().startswith("image,caption,score,kept")


@pytest.mark.parametrize("extra, message", [
    (("--duplicates", "maybe"), "--duplicates must be one of drop, list, off"),
    (("--dup_threshold", "1.5"), "--dup_threshold must be a cosine similarity, from -1 to 1"),
    (("--input", "shards/{00000..00002}.tar"), "names WebDataset shards"),
    (("--output", "kept.txt"), "must end in .json, .jsonl, .csv, .tsv"),
    (("--against", "val_missing.json"), "against 'val_missing.json' is not a file; point --against at a caption"),
])
def test_bad_settings_are_one_line(run, tmp_path, extra, message):
    result = run(tmp_path / "kept.json", *extra, model_path=tmp_path / "missing.pth")
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_entries_are_all_reported_before_the_model_loads(data, run, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([data["train"][0], {"image": "train/absent.jpg", "caption": ["x"]},
                               {"image": data["train"][1]["image"]}]))
    result = run(tmp_path / "kept.json", "--input", bad, model_path=tmp_path / "missing.pth")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "2 of 3 entries are unusable" in lines[0]
    assert any("entry 1" in line and "image file missing" in line for line in lines)
    assert any("entry 2" in line and "needs both" in line for line in lines)
    assert not (tmp_path / "kept.json").exists()


def test_tiled_search_equals_the_full_matrix():
    torch.manual_seed(0)
    features = F.normalize(torch.randn(23, 8), dim=-1)
    features[[5, 17]] = features[2].clone()  # copies in three tiles
    # A chain: 3 ~ 10 and 10 ~ 21 (cosine 0.94) but not 3 ~ 21 (0.76): one group through 10.
    e1, e2 = torch.eye(8)[:2]
    for row, angle in ((3, 0.0), (10, 0.35), (21, 0.7)):
        features[row] = torch.cos(torch.tensor(angle)) * e1 + torch.sin(torch.tensor(angle)) * e2
    threshold = 0.9
    similarity = features @ features.T
    parent = list(range(23))
    for i, j in (similarity > threshold).nonzero().tolist():  # the reference: components of the full matrix
        a, b = sorted((parent[i], parent[j]))
        parent = [a if p == b else p for p in parent]
    components = {}
    for i, p in enumerate(parent):
        components.setdefault(p, []).append(i)
    expected = sorted(m for m in components.values() if len(m) > 1)
    assert [2, 5, 17] in expected and [3, 10, 21] in expected
    assert duplicate_groups(features, threshold, tile=4) == expected == duplicate_groups(features, threshold)

    with pytest.raises(UserError, match="dup_threshold -1 makes over 23 pairs of the 23 images near-duplicates"):
        duplicate_groups(features, -1, pairs_per_image=1)  # all 253 pairs at -1

    queries, keys = F.normalize(torch.randn(7, 8), dim=-1), F.normalize(torch.randn(11, 8), dim=-1)
    value, index = nearest(queries, keys, tile=3)
    full = (queries @ keys.T).max(dim=1)
    assert torch.equal(index, full.indices) and torch.allclose(value, full.values)


def test_a_group_keeps_its_first_image_that_still_has_a_caption():
    from utils.eval.curate import curate

    entries = [{"image": name, "caption": ["x", "y"]} for name in "abcd"]
    scores = torch.tensor([0.1, 0.1, 0.5, 0.1, 0.5, 0.5, 0.1, 0.5])  # a has no caption at 0.3 or more
    kept, why = curate(entries, scores, 0.3, [[0, 1, 2]], drop_duplicates=True)
    assert kept == {1: {"image": "b", "caption": ["x"]}, 3: {"image": "d", "caption": ["y"]}}
    assert why == ["score", "score", "", "score", "duplicate of b", "duplicate of b", "score", ""]
    # "At least": a score equal to min_clip_score stays.
    kept, _ = curate(entries, scores, 0.5, [], drop_duplicates=False)
    assert kept == {1: {"image": "b", "caption": ["x"]}, 2: {"image": "c", "caption": ["x", "y"]},
                    3: {"image": "d", "caption": ["y"]}}
