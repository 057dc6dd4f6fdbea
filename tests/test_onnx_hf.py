"""ONNX export and torch-free prediction of the text towers that read a Hugging Face tokenizer: CLIPA's (bert-base-uncased,
[SEP] stripped), the hf kind's (NLLB's encoder through transformers), MetaCLIP 2 "worldwide" (XLM-V's ids in OpenAI's
causal tower) and AltCLIP's (XLM-R). Small random-weight models, built as each family's own tests build them (every
parameter moved), are loaded with phi="auto", exported once each, and OnnxCLIP's features on a real photo and on
English (and Chinese) captions are held to the PyTorch model's within 1e-4, its ids to the PyTorch tokenizer's exactly.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
open_clip = pytest.importorskip("open_clip")

ROOT = Path(__file__).resolve().parents[1]
ENGLISH = ["A photo of the DOG", "two red cars on a  small tree house &amp; a bird", "", "cat " * 100]
CHINESE = ["这是一张猫的照片", "一只狗"]
# Per kind: the captions, the pad id, and whether onnx_predict may drop columns of padding alone (the tower masks
# the padding, or never reads past the pooled token) or must give the full context (CLIPA attends to its padding and
# pools the last position).
KINDS = {"clipa": (ENGLISH, 0, False), "hf": (ENGLISH + CHINESE, 1, True), "worldwide": (ENGLISH + CHINESE, 1, True),
         "altclip": (ENGLISH + CHINESE, 1, True)}


def _clipa(folder: Path) -> Path:
    from tests.test_clipa import _clipa_folder

    return _clipa_folder(folder)


def _hf(folder: Path) -> Path:
    from tests.conftest import write_hf_tokenizer
    from tests.test_hf_text import SMALL, _nllb_tokenizer, _open_clip_folder, _reference

    cfg = SMALL["nllb-cls-linear"]
    with pytest.MonkeyPatch.context() as patch:
        reference = _reference("tiny-onnx-nllb", cfg, patch)
    return _open_clip_folder(folder / "hub", cfg, reference, write_hf_tokenizer(folder / "tok", *_nllb_tokenizer()))


def _worldwide(folder: Path) -> Path:
    from tests.test_open_clip import _open_clip_model
    from tests.test_worldwide import SMALL, _folder

    return _folder(folder, _open_clip_model(SMALL))


def _altclip(folder: Path) -> Path:
    from tests.test_multilingual_hf import save_folder, tiny_altclip

    return save_folder(tiny_altclip(), folder / "altclip")


_FOLDERS = {"clipa": _clipa, "hf": _hf, "worldwide": _worldwide, "altclip": _altclip}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """kind -> (the PyTorch model, its export folder, export_files' printed lines), each kind built and exported
    once, when a test first asks for it."""
    from clip import CLIP
    from tests.test_hf_text import scale_down_hub
    from utils.export.onnx_export import export_files, write_files

    made = {}

    def get(kind: str):
        if kind not in made:
            root = tmp_path_factory.mktemp(kind)
            with pytest.MonkeyPatch.context() as patch:
                scale_down_hub(patch)  # the hf kind's small sizes in the table phi="auto" reads
                model = CLIP(model_path=str(_FOLDERS[kind](root)), phi="auto", cuda=False, precision="fp32",
                             fast_decode=False)
                lines = []
                files = export_files(model, log=lines.append)
            (root / "export").mkdir()
            write_files(root / "export", files)
            made[kind] = model, root / "export", lines
        return made[kind]

    return get


def _photo():
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return Image.fromarray(load_sample_images().images[1])


@pytest.mark.slow  # an export of both towers: about 10 s each on 2 cores
@pytest.mark.parametrize("kind", list(KINDS))
def test_onnx_clip_gives_the_pytorch_models_ids_and_features_within_1e_4(exported, kind):
    from utils.export.onnx_predict import OnnxCLIP

    model, folder, lines = exported(kind)
    captions, pad_id, trims = KINDS[kind]
    config = json.loads((folder / "config.json").read_text())
    assert (config["tokenizer"], config["hub_tokenizer"], config["pad_id"], config["trim_padding"]) == \
        ("hub", model.net.config.text.tokenizer, pad_id, trims)
    assert config["text_language"] is None  # none set: the tokenizer's own default
    # The tokenizer files the model read, copied (CLIPA's WordPiece vocab.txt, the others' tokenizer.json).
    source = model.tokenizer.folder
    copied = {p.name for p in folder.iterdir()} - {"config.json", "image.onnx", "text.onnx"}
    assert copied == {"vocab.txt" if kind == "clipa" else "tokenizer.json", "tokenizer_config.json"}
    assert all((folder / n).read_bytes() == (source / n).read_bytes() for n in copied)
    onnx = OnnxCLIP(folder, fast_decode=False)
    ids = onnx.tokenize(captions)
    assert np.array_equal(ids, model.tokenize(captions).numpy())
    # Padded, the long caption cut to the context (its </s> last; CLIPA's [SEP] is stripped to 0, its padding).
    assert (ids[:3, -1] == pad_id).all() and (ids[3, -1] == pad_id) == (kind == "clipa")
    photo = _photo()
    with torch.no_grad():
        image, text = (f.numpy() for f in model.detect_image_for_eval(images=[photo], texts=captions))
    got_image, got_text = onnx.encode_image(onnx.preprocess(photo)), onnx.encode_text(ids)
    differences = np.abs(got_image - image).max(), np.abs(got_text - text).max()
    assert max(differences) < 1e-4 and min(np.abs(image).max(), np.abs(text).max()) > 1e-2
    # export_files' own check, on its captions, within the same tolerance
    assert [line.split(":")[0] for line in lines] == ["image.onnx", "text.onnx"]
    assert max(float(line.split("PyTorch fp32| = ")[1].split()[0]) for line in lines) < 1e-4
    print(f"\n{kind}: max |onnxruntime - PyTorch| image {differences[0]:.1e}, text {differences[1]:.1e}")


@pytest.mark.slow  # one interpreter for the four exports
def test_predict_onnx_tokenizes_and_encodes_these_without_torch(exported):
    """A deployment has no torch: OnnxCLIP reads the tokenizer files of the export folder with transformers' tokenizers
    alone and gives the same ids and features."""
    folders = {kind: str(exported(kind)[1]) for kind in KINDS}
    code = ("import json, sys; sys.modules['torch'] = sys.modules['torchvision'] = None\n"
            "from utils.export.onnx_predict import OnnxCLIP\n"
            f"folders, kinds = {folders!r}, {json.dumps({k: v[0] for k, v in KINDS.items()})}\n"
            "out = {}\n"
            "for kind, folder in folders.items():\n"
            "    onnx = OnnxCLIP(folder)\n"
            "    ids = onnx.tokenize(kinds[kind])\n"
            "    out[kind] = [ids.tolist(), onnx.encode_text(ids).tolist()]\n"
            "print(json.dumps(out))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.splitlines()[-1])
    for kind, (ids, features) in got.items():
        model = exported(kind)[0]
        captions = KINDS[kind][0]
        with torch.no_grad():
            want = model.net.encode_text(model.tokenize(captions)).numpy()
        assert ids == model.tokenize(captions).tolist()
        assert np.abs(np.array(features) - want).max() < 1e-4


class _EighTower(torch.nn.Module):
    """A text tower with an op torch's ONNX exporter has no function for (an eigen-decomposition)."""

    context_length = 8

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(20, 4)

    def forward_padded(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)  # N, L, 4
        return torch.linalg.eigh(x.transpose(1, 2) @ x)[0]


def test_a_text_tower_with_an_op_that_does_not_export_is_refused_in_one_line_naming_it():
    from utils.errors import UserError
    from nets.onnx_towers import export_or_refuse
    from nets.onnx_towers import HFTextEncoder

    with pytest.raises(UserError) as e:
        export_or_refuse(HFTextEncoder(_EighTower(), 20, 1).eval(), torch.float32, "tiny's text tower")
    message = str(e.value)
    assert "\n" not in message and "tiny's text tower" in message and "aten._linalg_eigh" in message
