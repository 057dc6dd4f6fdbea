"""Zero-shot in two languages through one multilingual tower: eval.py's zero-shot run on a tiny AltCLIP folder (XLM-R
text tower, its tokenizer from the folder) with Chinese class names and `templates zh` (Chinese-CLIP's 80), and with
English ones and `templates en`, scores the images as transformers' AltCLIPModel does with the same prompts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.conftest import run_script
from tests.test_multilingual_hf import save_folder, tiny_altclip
from utils.eval.zeroshot import zeroshot_metrics
from utils.prompts import load_templates

transformers = pytest.importorskip("transformers")

# Folder (sorted) -> its Chinese class name; the English one is the folder's name.
CLASSES = {"car": "汽车", "cat": "猫", "dog": "狗"}


def _tree(root: Path) -> list[tuple[Path, int]]:
    images = []
    for label, (name, colour) in enumerate(zip(CLASSES, ((220, 30, 30), (30, 200, 40), (30, 40, 220)))):
        (root / name).mkdir(parents=True)
        for i in range(2):
            path = root / name / f"{i}.png"
            Image.new("RGB", (40, 48), tuple(max(0, c - 60 * i) for c in colour)).save(path)
            images.append((path, label))
    return images


def _transformers_zeroshot(model, folder: Path, images, names: list[str], language: str) -> tuple[dict, torch.Tensor]:
    """(acc1 and the rest, the class embeddings) from transformers' features: its image processor and tokenizer of
    the folder, each class the renormalised mean of its normalised template features."""
    processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        pixels = processor(images=[Image.open(p).convert("RGB") for p, _ in images], return_tensors="pt")
        image = F.normalize(model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output, dim=-1)
        rows = []
        for name in names:
            prompts = tokenizer([t.replace("{c}", name) for t in load_templates(language)], padding=True,
                                return_tensors="pt")
            text = model.get_text_features(input_ids=prompts["input_ids"],
                                           attention_mask=prompts["attention_mask"]).pooler_output
            rows.append(F.normalize(F.normalize(text, dim=-1).mean(0), dim=0))
    classes = torch.stack(rows)
    return zeroshot_metrics(image @ classes.T, torch.tensor([label for _, label in images])), classes


@pytest.mark.parametrize("language", ["zh", "en"])
def test_eval_zeroshot_through_a_multilingual_tower_equals_transformers_in_chinese_and_english(tmp_path, capsys,
                                                                                               language):
    model = tiny_altclip()
    folder = save_folder(model, tmp_path / "altclip")
    images = _tree(tmp_path / "classes")
    names = list(CLASSES.values()) if language == "zh" else list(CLASSES)
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    out = tmp_path / "results.json"
    run = run_script("eval.py", "--eval_type", "zeroshot", "--phi", "auto", "--model_path", str(folder),
                     "--datasets_path", str(tmp_path / "classes"), "--datasets_val_json_path", str(tmp_path / "no.json"),
                     "--classnames", str(tmp_path / "names.txt"), "--templates", language, "--output", str(out),
                     "--feature_cache", "false", "--fast_decode", "false", "--num_workers", "0", capsys=capsys)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text(encoding="utf-8"))
    assert results["language"] == language and results["templates"] == 80 and results["classnames"] == names
    expected, classes = _transformers_zeroshot(model, folder, images, names, language)
    # The class embeddings eval.py scored with (CLIP.class_embeddings: the same templates and ensembling).
    from clip import CLIP

    ours = CLIP(model_path=str(folder), phi="auto", cuda=False).class_embeddings(names, language)
    assert (ours.float() - classes).abs().max() < 1e-4
    assert results["metrics"] == pytest.approx(expected["metrics"])
    assert results["per_class_recall"] == pytest.approx(expected["per_class_recall"])
    assert "6 images, 3 classes, 80 templates" in run.stdout
