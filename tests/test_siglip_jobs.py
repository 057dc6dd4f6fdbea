"""Every job with a SigLIP model (a small random-weight one saved as a project weight file, its tokenizer files
beside it), each through its real entry point: predict and dir_predict give sigmoid(scale * cos + bias) per name
and say the probabilities are independent, search / embed / index / web / curate run on its tokenizer, eval's
retrieval, zero-shot and WiSE-FT run, export_onnx writes logit_bias and sigmoid scores and predict_onnx equals the
eager model within 1e-4, and train.py reads the tokenizer beside the weights and leaves it beside its own."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nets import build_model
from nets.configs import CLIPConfig, TextConfig, VisionConfig
from tests.conftest import run_script
from tests.test_siglip_tokenizer import write_tokenizer
from utils.data.preprocess import Preprocess
from utils.weights.arch import save_weights

pytest.importorskip("timm")
pytest.importorskip("tokenizers")

# SigLIP 2's towers at test size: timm's SigLIP ViT (no class token, attention pool), the bidirectional text tower.
TINY_SIGLIP = CLIPConfig(
    embed_dim=64,
    vision=VisionConfig(kind="timm", timm_model_name="vit_base_patch16_siglip_224", image_size=32, patch_size=8,
                        width=64, layers=2, heads=2, mlp_ratio=3.5, activation="gelu"),
    text=TextConfig(kind="siglip", context_length=16, vocab_size=120, width=64, layers=2, heads=2, mlp_ratio=3.5,
                    activation="gelu_tanh", eps=1e-6, proj_bias=True),
    init_logit_bias=-10.0)
SIGLIP_PREPROCESS = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", resize_mode="squash")
COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}
TEMPLATE = "a photo of a {c}"
LABELS = ["dog", "cat", "bird"]
# A bias of -10 puts every random-weight score near 0, where softmax and sigmoid could not be told apart by eye.
BIAS, SCALE = -1.0, 8.0


@pytest.fixture(scope="module")
def siglip(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("siglip_jobs")
    torch.manual_seed(0)
    net = build_model(TINY_SIGLIP)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():  # every parameter off its init, the attention pool's latent too
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        net.logit_bias.fill_(BIAS)
        net.logit_scale.fill_(math.log(SCALE))
    weights = tmp / "model" / "siglip.pth"
    weights.parent.mkdir()
    save_weights(net.state_dict(), weights, TINY_SIGLIP, "custom", SIGLIP_PREPROCESS)
    write_tokenizer(weights.parent)
    images = tmp / "images"
    images.mkdir()
    for i, (name, colour) in enumerate(COLOURS.items()):
        Image.new("RGB", (40 + 8 * i, 36), colour).save(images / f"{name}.png")
    return {"tmp": tmp, "weights": weights, "net": net.eval(), "images": images}


def _model_args(siglip) -> list[str]:
    return ["--model_path", str(siglip["weights"]), "--phi", "auto", "--Cuda", "false"]


@torch.no_grad()
def _expected(siglip, image: Path, texts: list[str]) -> np.ndarray:
    """sigmoid(scale * cos + bias) from the saved net's own towers: the image as the weights' preprocessing makes
    it (mean = std = 0.5, a bicubic squash), the captions through the tokenizer files beside the weights."""
    from utils.tokenizer import SiglipTokenizer

    net = siglip["net"]
    pixels = (torch.from_numpy(np.array(Image.open(image).convert("RGB").resize((32, 32), Image.BICUBIC)))
              .permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    tokens = SiglipTokenizer(siglip["weights"].parent, 16)(texts)
    cos = F.normalize(net.encode_image(pixels[None]), dim=-1) @ F.normalize(net.encode_text(tokens), dim=-1).t()
    return torch.sigmoid(SCALE * cos + BIAS).numpy()


def _printed_scores(stdout: str) -> dict[str, float]:
    rows = [line.split("  ", 1) for line in stdout.splitlines() if line[:1].isdigit() and "  " in line]
    return {name: float(p) for p, name in rows}


@pytest.mark.parametrize("kind", ["captions", "labels"])
def test_predict_prints_independent_sigmoids_of_scale_cos_plus_bias(siglip, kind, capsys):
    image = siglip["images"] / "red.png"
    names = ["a red square", "a dog on the beach", "two birds"] if kind == "captions" else LABELS
    code, out, err = run_script("predict.py", *_model_args(siglip), "--mode", "predict", "--image", str(image),
                                f"--{kind}", *names, "--templates", TEMPLATE, capsys=capsys, threads=1)
    assert code == 0, err[-2000:]
    texts = names if kind == "captions" else [TEMPLATE.replace("{c}", n) for n in names]
    expected = dict(zip(names, _expected(siglip, image, texts)[0]))
    printed = _printed_scores(out)
    assert set(printed) == set(names)
    for name in names:
        assert abs(printed[name] - expected[name]) <= 1e-4  # printed to 4 places
    assert abs(sum(expected.values()) - 1) > 0.05 and "independent" in out and "do not sum to 1" in out


def test_dir_predict_writes_the_sigmoid_probabilities(siglip, capsys):
    out_dir = siglip["tmp"] / "dir_out"
    code, out, err = run_script("predict.py", *_model_args(siglip), "--mode", "dir_predict", "--dir_origin_path",
                                str(siglip["images"]), "--dir_save_path", str(out_dir), "--labels", *LABELS,
                                "--templates", TEMPLATE, "--top_k", "3", capsys=capsys, threads=1)
    assert code == 0, err[-2000:]
    rows = list(csv.DictReader(next(out_dir.glob("*.csv")).open()))
    assert len(rows) == len(COLOURS)
    for row in rows:
        expected = dict(zip(LABELS, _expected(siglip, siglip["images"] / row["path"],
                                              [TEMPLATE.replace("{c}", n) for n in LABELS])[0]))
        for rank in (1, 2, 3):
            assert abs(float(row[f"prob{rank}"]) - expected[row[f"label{rank}"]]) <= 1e-4
        assert abs(sum(float(row[f"prob{r}"]) for r in (1, 2, 3)) - 1) > 0.05


def test_search_embed_and_index_run_on_its_tokenizer(siglip, capsys):
    from utils.tokenizer import SiglipTokenizer

    args = _model_args(siglip)
    code, out, err = run_script("predict.py", *args, "--mode", "search", "--dir_origin_path", str(siglip["images"]),
                                "--index_dir", str(siglip["tmp"] / "search_index"), "--query", "a red square",
                                capsys=capsys, threads=1)
    assert code == 0, err[-2000:]
    net = siglip["net"]
    with torch.no_grad():
        query = F.normalize(net.encode_text(SiglipTokenizer(siglip["weights"].parent, 16)(["a red square"])), dim=-1)
    printed = {Path(line.split()[1]).name: float(line.split()[0]) for line in out.splitlines()
               if line.split() and line.split()[-1].endswith(".png")}
    assert set(printed) == {f"{c}.png" for c in COLOURS}
    for name, score in printed.items():  # cosines of the SigLIP text feature, not of BPE ids
        pixels = (torch.from_numpy(np.array(Image.open(siglip["images"] / name).convert("RGB")
                                              .resize((32, 32), Image.BICUBIC))).permute(2, 0, 1).float() / 255 - .5) / .5
        with torch.no_grad():
            cos = (F.normalize(net.encode_image(pixels[None]), dim=-1) @ query.t()).item()
        assert abs(score - cos) <= 1e-3
    embeddings = siglip["tmp"] / "embeddings"
    code, out, err = run_script("predict.py", *args, "--mode", "embed", "--dir_origin_path", str(siglip["images"]),
                                "--embeddings_dir", str(embeddings), "--num_workers", "0", capsys=capsys, threads=1)
    assert code == 0, err[-2000:]
    vectors = np.concatenate([np.load(p) for p in sorted((embeddings / "img_emb").glob("*.npy"))])
    assert vectors.shape == (len(COLOURS), TINY_SIGLIP.embed_dim)
    code, out, err = run_script("predict.py", *args, "--mode", "index", "--embeddings_dir", str(embeddings),
                                "--index_dir", str(siglip["tmp"] / "faiss_index"), capsys=capsys, threads=1)
    assert code == 0, err[-2000:]
    assert f"{len(COLOURS)} vectors" in out


def test_web_classify_gives_sigmoids_and_says_they_are_independent(siglip):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from clip import CLIP
    from utils.web.app import create_app

    model = CLIP(model_path=str(siglip["weights"]), phi="auto", cuda=False)
    image = siglip["images"] / "blue.png"
    client = TestClient(create_app(model, None, None, TEMPLATE), base_url="http://127.0.0.1")
    response = client.post("/api/classify", data={"texts": "\n".join(LABELS), "kind": "labels"},
                           files={"image": ("blue.png", image.read_bytes(), "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = _expected(siglip, image, [TEMPLATE.replace("{c}", n) for n in LABELS])[0]
    assert np.abs(np.array(body["probs"]) - expected).max() <= 1e-4
    assert body["independent"] is True and "do not sum to 1" in body["note"]


@pytest.mark.slow
def test_export_onnx_writes_the_bias_and_predict_onnx_equals_the_model_within_1e_4(siglip, capsys):
    pytest.importorskip("onnxruntime")
    from clip import CLIP
    from utils.export.onnx_predict import OnnxCLIP

    export = siglip["tmp"] / "onnx"
    code, out, err = run_script("predict.py", *_model_args(siglip), "--mode", "export_onnx", "--export_dir",
                                str(export), capsys=capsys, threads=1)
    assert code == 0, err[-2000:]
    config = json.loads((export / "config.json").read_text())
    assert config["scores"] == "sigmoid" and config["logit_bias"] == pytest.approx(BIAS)
    assert config["logit_scale"] == pytest.approx(SCALE) and config["tokenizer"] == "siglip"
    assert (export / "tokenizer.json").is_file()
    onnx, eager = OnnxCLIP(export), CLIP(model_path=str(siglip["weights"]), phi="auto", cuda=False, onednn=False)
    captions = ["a red square", "A DOG, on the beach!", "two birds in the sky", ""]
    assert (onnx.tokenize(captions) == eager.tokenize(captions).numpy()).all()
    image = eager.open_image(siglip["images"] / "green.png")
    with torch.no_grad():
        want_image = eager.net.encode_image(eager.preprocess(image)).numpy()
        want_text = eager.net.encode_text(eager.tokenize(captions)).numpy()
    assert np.abs(onnx.encode_image(onnx.preprocess(image)) - want_image).max() <= 1e-4
    assert np.abs(onnx.encode_text(onnx.tokenize(captions)) - want_text).max() <= 1e-4
    probs = onnx.detect_image(image, captions)
    assert np.abs(probs - eager.detect_image(image, captions)).max() <= 1e-4
    assert np.abs(probs - _expected(siglip, siglip["images"] / "green.png", captions)).max() <= 1e-4
    classes = onnx.classify(image, onnx.class_embeddings(LABELS, TEMPLATE))
    assert np.abs(classes - eager.classify(image, eager.class_embeddings(LABELS, TEMPLATE))).max() <= 1e-4
    # predict_onnx with torch unimportable, as a deployment runs it: SigLIP's tokenizer needs transformers' tokenizers
    # only, and the printed probabilities are the eager model's.
    import subprocess
    import sys

    args = ["--mode", "predict_onnx", "--export_dir", str(export), "--image", str(siglip["images"] / "green.png"),
            "--captions", *captions[:3]]
    code = ("import runpy, sys; sys.modules['torch'] = sys.modules['torchvision'] = None; "
            f"sys.argv = ['predict.py', *{args!r}]; runpy.run_path('predict.py', run_name='__main__')")
    without = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=120)
    assert without.returncode == 0 and "do not sum to 1" in without.stdout, without.stderr[-2000:]
    printed = _printed_scores(without.stdout)
    want = eager.detect_image(image, captions[:3])[0]
    assert all(abs(printed[c] - p) <= 1e-4 for c, p in zip(captions[:3], want))


@pytest.fixture(scope="module")
def toy(siglip):
    from utils.data.toy import make_toy_dataset

    root = siglip["tmp"] / "toy"
    make_toy_dataset(root, n_train=16, n_val=8, seed=1)
    return root


@pytest.fixture(scope="module")
def trained(siglip, toy):
    """One epoch of train.py from the SigLIP weights (sigmoid loss: what they were trained with)."""
    save_dir = siglip["tmp"] / "run"
    result = run_script("train.py", *_model_args(siglip), "--datasets_path", str(toy), "--datasets_train_json_path",
                        str(toy / "en_train.json"), "--datasets_val_json_path", str(toy / "en_val.json"),
                        "--batch_size", "8", "--Epoch", "1", "--num_workers", "0", "--save_dir", str(save_dir),
                        "--bert_path", "", "--eval_period", "1", "--seed", "3", threads=1)
    return save_dir, result


@pytest.mark.slow
def test_train_reads_the_tokenizer_beside_the_weights_and_saves_it_beside_its_own(siglip, trained, capsys):
    from utils.tokenizer import SiglipTokenizer

    save_dir, result = trained
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loss=sigmoid" in result.stdout
    assert (save_dir / "tokenizer.json").read_bytes() == (siglip["weights"].parent / "tokenizer.json").read_bytes()
    weights = torch.load(save_dir / "last_epoch_weights.pth", weights_only=True)
    assert weights["logit_bias"].item() != BIAS  # trained with the sigmoid loss, on SigLIP's ids
    # A job on the trained file finds the tokenizer beside it.
    code, out, err = run_script("predict.py", "--model_path", str(save_dir / "last_epoch_weights.pth"), "--phi",
                                "auto", "--Cuda", "false", "--mode", "predict", "--image",
                                str(siglip["images"] / "red.png"), "--captions", "a red square", "two birds",
                                capsys=capsys, threads=1)
    assert code == 0 and "do not sum to 1" in out, err[-2000:]
    tokens = SiglipTokenizer(save_dir, 16).ids(["a red square"])
    assert (tokens == SiglipTokenizer(siglip["weights"].parent, 16).ids(["a red square"])).all()


@pytest.mark.slow
def test_eval_retrieval_zeroshot_and_wise_ft_run_with_a_siglip(siglip, toy, trained, capsys):
    save_dir, result = trained
    assert result.returncode == 0, result.stderr[-3000:]
    common = ["--batch_size", "4", "--num_workers", "0", "--Cuda", "false", "--phi", "auto", "--cache_dir",
              str(siglip["tmp"] / "eval_cache")]
    code, out, err = run_script("eval.py", "--model_path", str(siglip["weights"]), *common, "--datasets_path",
                                str(toy), "--datasets_val_json_path", str(toy / "en_val.json"), "--output",
                                str(siglip["tmp"] / "retrieval.json"), capsys=capsys, threads=1)
    assert code == 0, err[-2000:]
    assert "r_mean" in json.loads((siglip["tmp"] / "retrieval.json").read_text())["metrics"]
    classes = siglip["tmp"] / "classes"
    for name, colour in COLOURS.items():
        (classes / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32 + 4 * i, 32), colour).save(classes / name / f"{i}.png")
    code, out, err = run_script("eval.py", "--eval_type", "zeroshot", "--model_path", str(siglip["weights"]),
                                *common, "--datasets_path", str(classes), "--templates", TEMPLATE, "--output",
                                str(siglip["tmp"] / "zeroshot.json"), capsys=capsys, threads=1)
    assert code == 0, err[-2000:]
    # Accuracy is the argmax of the cosines (the bias and the sigmoid keep the order): computed here from the towers.
    expected = np.concatenate([_expected(siglip, classes / n / f"{i}.png",
                                         [TEMPLATE.replace("{c}", c) for c in sorted(COLOURS)])
                               for n in sorted(COLOURS) for i in range(2)])
    acc1 = float(np.mean(expected.argmax(1) == np.repeat(np.arange(3), 2)))
    assert json.loads((siglip["tmp"] / "zeroshot.json").read_text())["metrics"]["acc1"] == pytest.approx(acc1)
    code, out, err = run_script("eval.py", "--eval_type", "wise_ft", "--model_path",
                                str(save_dir / "last_epoch_weights.pth"), "--wise_ft_start_path",
                                str(siglip["weights"]), "--wise_ft_alphas", "0.0", "0.5", "1.0", *common,
                                "--datasets_path", str(toy), "--datasets_val_json_path", str(toy / "en_val.json"),
                                "--wise_ft_save_dir", str(siglip["tmp"] / "wise_ft"), capsys=capsys, threads=1)
    assert code == 0, err[-2000:]
    sweep = json.loads((siglip["tmp"] / "wise_ft" / "wise_ft_results.json").read_text())
    retrieval = json.loads((siglip["tmp"] / "retrieval.json").read_text())["metrics"]
    assert sweep["rows"][0]["val"]["r_mean"] == pytest.approx(retrieval["r_mean"])  # alpha 0: the start weights
    # The chosen blend is a SigLIP weight file like the others: its tokenizer beside it, a job runs on it.
    code, out, err = run_script("predict.py", "--model_path", str(siglip["tmp"] / "wise_ft" / "wise_ft_weights.pth"),
                                "--phi", "auto", "--Cuda", "false", "--image", str(siglip["images"] / "red.png"),
                                "--captions", "a red square", "two birds", capsys=capsys, threads=1)
    assert code == 0 and "do not sum to 1" in out, err[-2000:]


@pytest.mark.slow
def test_curate_scores_captions_with_its_tokenizer(siglip, toy, capsys):
    from clip import CLIP
    from utils.tokenizer import SiglipTokenizer

    out = siglip["tmp"] / "curated.json"
    code, _, err = run_script("datasets/curate.py", "--datasets_path", str(toy), "--input", str(toy / "en_train.json"),
                              "--output", str(out), "--model_path", str(siglip["weights"]), "--phi", "auto",
                              "--num_workers", "0", "--batch_size", "4", "--Cuda", "false", "--min_clip_score", "-1",
                              "--duplicates", "off",
                              capsys=capsys, threads=1)
    assert code == 0, err[-2000:]
    assert len(json.loads(out.read_text())) == 16
    rows = list(csv.DictReader(out.with_name("curated_scores.csv").open()))
    model = CLIP(model_path=str(siglip["weights"]), phi="auto", cuda=False)
    for row in rows[:3]:  # the cosine of SigLIP's text feature of the caption, not of BPE ids
        with torch.no_grad():
            image = F.normalize(model.net.encode_image(model.preprocess(model.open_image(toy / row["image"]))), dim=-1)
            text = F.normalize(model.net.encode_text(SiglipTokenizer(siglip["weights"].parent, 16)([row["caption"]])),
                               dim=-1)
        assert abs(float(row["score"]) - (image @ text.t()).item()) <= 1e-4
