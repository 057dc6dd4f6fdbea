"""Zero-shot classification: metrics by hand, ensembling against a direct computation, eval.py end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nets import build_model, get_config
from tests.conftest import run_script
from utils.errors import UserError
from utils.eval.zeroshot import folder_dataset, zeroshot_metrics
from utils.prompts import class_embeddings, load_templates
from utils.tokenizer import build_tokenizer
from utils.weights.arch import save_weights

ROOT = Path(__file__).resolve().parents[1]


def test_metrics_match_a_hand_computation():
    # 6 classes; rows are images, true labels below. Top-1 picks: 0, 2, 2, 3, 5, 0.
    logits = torch.tensor([[9., 1, 2, 3, 4, 5], [1., 2, 9, 3, 4, 5], [1., 2, 9, 3, 4, 5],
                           [1., 2, 3, 9, 4, 5], [5., 4, 3, 2, 1, 9], [9., 8, 7, 6, 5, 0]])
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    result = zeroshot_metrics(logits, labels)
    # acc1: images 0, 2 and 3 are right: 3/6. Top 5 of image 1 is 2, 5, 4, 3, 1 (has 1); of image 4 it is
    # 5, 0, 1, 2, 3 (misses 4); of image 5 it is 0, 1, 2, 3, 4 (misses 5); the others hit at top 1: acc5 = 4/6.
    assert result["metrics"]["acc1"] == pytest.approx(3 / 6)
    assert result["metrics"]["acc5"] == pytest.approx(4 / 6)
    # One image per class: per-class recall = [1, 0, 1, 1, 0, 0], mean 0.5.
    assert result["per_class_recall"] == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert result["metrics"]["mean_per_class_recall"] == pytest.approx(0.5)
    assert result["confusion"][1][2] == 1 and result["confusion"][5][0] == 1


def test_mean_per_class_recall_is_balanced_accuracy_and_acc5_needs_5_classes():
    # 3 classes, class 0 has 3 images (2 right), class 1 has 1 (right), class 2 none.
    logits = torch.tensor([[5., 1, 0], [5., 1, 0], [1., 5, 0], [0., 5, 1]])
    result = zeroshot_metrics(logits, torch.tensor([0, 0, 0, 1]))
    assert result["metrics"] == {"acc1": pytest.approx(0.75), "mean_per_class_recall": pytest.approx((2 / 3 + 1) / 2)}
    assert result["per_class_count"] == [3, 1, 0]


def test_ensembling_is_the_mean_of_normalised_template_embeddings_renormalised():
    torch.manual_seed(0)
    model = build_model(get_config("tiny/VIT-T-8")).eval()
    tokenizer = build_tokenizer("openai", 77)
    templates = ["a photo of a {c}.", "a drawing of the {c}", "{c}"]
    got = class_embeddings(model.encode_text, tokenizer, ["cat", "red circle"], templates, torch.device("cpu"))
    for row, name in zip(got, ["cat", "red circle"]):
        direct = torch.stack([F.normalize(model.encode_text(tokenizer(t.format(c=name))), dim=-1)[0]
                              for t in templates]).mean(0)
        assert torch.allclose(row, direct / direct.norm(), atol=1e-6)
        assert row.norm().item() == pytest.approx(1.0, abs=1e-6)


def test_templates_and_classes_refuse_bad_input(tmp_path):
    assert len(load_templates("")) == 80 and all("{c}" in t for t in load_templates(""))
    assert all("{c}" in t for t in load_templates("", "cn"))
    assert load_templates("a sketch of {c}") == ["a sketch of {c}"]
    with pytest.raises(UserError, match="has no \\{c\\}"):
        load_templates("a photo of a {}")
    (tmp_path / "t.json").write_text('["a {c}", "no class here"]')
    with pytest.raises(UserError, match="'no class here' has no"):
        load_templates(str(tmp_path / "t.json"))
    with pytest.raises(UserError, match="does not exist"):
        folder_dataset(tmp_path / "nowhere")
    with pytest.raises(UserError, match="has no class subfolders"):
        folder_dataset(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(UserError, match="hold no images"):
        folder_dataset(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "a.png")
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    with pytest.raises(UserError, match="has 2 names for 1 classes"):
        folder_dataset(tmp_path, str(tmp_path / "names.txt"))


def _folder_tree(root: Path) -> None:
    """Three classes of flat-colour images: 3, 2 and 2 images."""
    for name, colour, count in (("red_things", (220, 30, 30), 3), ("green_things", (30, 200, 40), 2),
                                ("blue_things", (30, 40, 220), 2)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (40, 40), tuple(max(0, c - 20 * i) for c in colour)).save(root / name / f"{i}.png")


def _eval(capsys, **settings):
    args = [x for k, v in settings.items() for x in (f"--{k}", str(v))]
    return run_script("eval.py", "--eval_type", "zeroshot", "--phi", "auto", "--num_workers", "0", *args,
                      capsys=capsys)


@pytest.mark.slow
def test_eval_zeroshot_end_to_end_on_a_folder_tree_and_a_labelled_json(tmp_path, capsys):
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pth"
    # As training saves it (architecture recorded beside it): auto has nothing to say, stderr holds only errors.
    save_weights(build_model(get_config("tiny/VIT-T-8")).state_dict(), weights, get_config("tiny/VIT-T-8"),
                 "tiny/VIT-T-8")
    tree = tmp_path / "classes"
    _folder_tree(tree)
    out = tmp_path / "results.json"
    common = dict(model_path=weights, datasets_path=tree, templates="a photo of {c}.")
    folder_run = dict(common, datasets_val_json_path=tmp_path / "none.json", output=out, cache_dir=tmp_path / "cache")
    first = _eval(capsys, **folder_run)
    assert first.returncode == 0, first.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["task"] == "zeroshot_classification" and results["language"] == "en"
    assert set(results["metrics"]) == {"acc1", "mean_per_class_recall"}  # 3 classes: no acc5
    assert results["classnames"] == ["blue things", "green things", "red things"] and results["images"] == 7
    assert (tmp_path / "results_confusion.png").stat().st_size > 0
    assert "blue things" in first.stdout and "acc1" in first.stdout and "7 images, 3 classes, 1 template," in first.stdout
    refused = _eval(capsys, **folder_run)
    assert refused.returncode == 2 and refused.stderr == f"error: {out} already exists (and 1 more); choose another " \
                                                         "output, or pass --overwrite true to replace it\n"
    (tmp_path / "results.json").rename(tmp_path / "moved.json")  # the confusion plot alone is refused too
    assert "results_confusion.png already exists" in _eval(capsys, **folder_run).stderr
    (tmp_path / "moved.json").rename(tmp_path / "results.json")
    second = _eval(capsys, **folder_run, overwrite="true")
    assert "using cached features" in second.stdout and json.loads(out.read_text())["metrics"] == results["metrics"]

    # The same images as the original's JSON with integer labels and a classnames file give the same numbers.
    entries = [{"image": f"{folder}/{p.name}", "label": label, "caption": ["x"]}
               for label, folder in enumerate(["blue_things", "green_things", "red_things"])
               for p in sorted((tree / folder).iterdir())]
    (tmp_path / "labelled.json").write_text(json.dumps(entries))
    (tmp_path / "names.txt").write_text("blue things\ngreen things\nred things\n")
    labelled = _eval(capsys, **common, datasets_val_json_path=tmp_path / "labelled.json", classnames=tmp_path / "names.txt",
                     output=tmp_path / "l.json", feature_cache="false")
    assert labelled.returncode == 0, labelled.stderr[-2000:]
    assert json.loads((tmp_path / "l.json").read_text())["metrics"] == pytest.approx(results["metrics"])
    bad = _eval(capsys, **dict(folder_run, templates="a photo", overwrite="true"))
    assert bad.returncode == 2 and bad.stderr.strip() == "error: template 'a photo' has no {c} where the class name goes"


@pytest.mark.slow
def test_predict_labels_with_one_template_equal_the_captions_it_makes(tmp_path, capsys):
    torch.manual_seed(1)
    weights = tmp_path / "tiny.pth"
    torch.save(build_model(get_config("tiny/VIT-T-8")).state_dict(), weights)

    def run(*args: str) -> dict[str, float]:
        code, out, err = run_script("predict.py", "--model_path", weights, "--phi", "auto", "--image",
                                    ROOT / "img" / "example.jpg", *args, capsys=capsys)
        assert code == 0, err
        return {line[8:]: float(line[:6]) for line in out.splitlines()}

    by_label = run("--labels", "cat", "red circle", "--templates", "a photo of a {c}.")
    by_caption = run("--captions", "a photo of a cat.", "a photo of a red circle.")
    assert by_label == {"cat": by_caption["a photo of a cat."], "red circle": by_caption["a photo of a red circle."]}
    assert sum(run("--labels", "cat", "dog", "bird").values()) == pytest.approx(1.0, abs=2e-4)  # 80 templates
