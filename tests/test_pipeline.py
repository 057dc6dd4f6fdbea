"""One image pipeline: every job that encodes images (embed, the search index, dir_predict, eval's retrieval,
zero-shot, WiSE-FT and curate, the training callback, the web page) gets, from the same folder of real photos,
the features CLIP.detect_image_for_eval gives for each photo alone, and lists the same unreadable file."""
from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clip import CLIP
from nets import build_model, get_config
from utils.data.pictures import ImagePipeline
from utils.errors import UserError

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """scikit-learn's two sample photos (640 x 427) as JPEG and PNG, one shrunk to a portrait, and a corrupt
    JPEG; a model with random weights; each readable photo's reference features."""
    from sklearn.datasets import load_sample_images

    tmp = tmp_path_factory.mktemp("pipeline")
    folder = tmp / "photos"
    (folder / "sub").mkdir(parents=True)
    china, flower = (Image.fromarray(array) for array in load_sample_images().images)
    china.save(folder / "china.jpg", quality=90)
    flower.save(folder / "flower.png")
    flower.transpose(Image.Transpose.ROTATE_90).resize((300, 451)).save(folder / "sub" / "portrait.jpg")
    (folder / "broken.jpg").write_bytes(b"not a JPEG: a text file saved with the wrong name")
    torch.manual_seed(3)
    torch.save(build_model(get_config("tiny/VIT-T-8")).state_dict(), tmp / "tiny.pth")
    model = CLIP(model_path=str(tmp / "tiny.pth"), phi="auto", cuda=False)
    readable = sorted(p for p in folder.rglob("*.*") if p.name != "broken.jpg")
    reference = {p: F.normalize(model.detect_image_for_eval(images=[model.open_image(p)])[0].float(), dim=-1)[0]
                 for p in readable}
    return {"tmp": tmp, "folder": folder, "model": model, "readable": readable, "reference": reference,
            "broken": folder / "broken.jpg"}


def _close(features: torch.Tensor, expected: list[torch.Tensor]) -> None:
    assert features.shape == (len(expected), expected[0].shape[0])
    assert (features.float().cpu() - torch.stack(expected)).abs().max() < TOLERANCE


def test_the_pipeline_gives_each_photos_features_and_names_the_unreadable_one(photos):
    paths = sorted(photos["folder"].rglob("*.*"))
    for batch_size, threads in ((1, 0), (2, 2), (32, None)):
        encoding = photos["model"].pipeline.encode(paths, batch_size, threads)
        features, positions = encoding.all()
        assert [paths[i] for i in positions] == photos["readable"]
        _close(features, [photos["reference"][p] for p in photos["readable"]])
        assert [name for name, _ in encoding.unreadable] == [str(photos["broken"])]
        assert encoding.unreadable[0][1].startswith("UnidentifiedImageError")
    # Bytes and an opened file decode as the path does.
    china = photos["folder"] / "china.jpg"
    with open(china, "rb") as file:
        features, _ = photos["model"].pipeline.encode([china.read_bytes(), file]).all()
    _close(features, [photos["reference"][china]] * 2)


@pytest.mark.slow
def test_embed_and_the_search_index(photos):
    from utils.predict.embed import folder_plan, item_features
    from utils.predict.search import encode_paths

    plan = folder_plan(photos["folder"], 100)
    items = plan.parts[0]()
    problems = []
    batches = list(item_features(photos["model"], items, batch_size=2, num_workers=2, problems=problems, text=False))
    _close(torch.cat([b[0] for b in batches]), [photos["reference"][p] for p in photos["readable"]])
    assert [row["image_path"] for b in batches for row in b[2]] == [str(p) for p in photos["readable"]]
    assert len(problems) == 1 and problems[0].startswith(f"{photos['broken']}: UnidentifiedImageError")

    features, unreadable = encode_paths(photos["model"], batch_size=2)(sorted(photos["folder"].rglob("*.*")))
    _close(features, [photos["reference"][p] for p in photos["readable"]])
    assert unreadable == [photos["broken"]]


@pytest.mark.slow
def test_dir_predict(photos):
    from utils.predict.folder import predict_folder

    model = photos["model"]
    names = ["a photo of a temple", "a photo of a flower", "a red square"]
    targets = F.normalize(model.detect_image_for_eval(texts=names)[1].float(), dim=-1)
    out, scored, problems = predict_folder(model, names, targets, photos["folder"], photos["tmp"] / "out.csv",
                                           top_k=3, batch_size=2)
    assert scored == 3 and len(problems) == 1 and problems[0].startswith(str(photos["broken"]))
    rows = list(csv.reader(io.StringIO(out.read_text())))[1:]
    scale = model.net.logit_scale.detach().exp().float()
    for row, path in zip(rows, photos["readable"]):
        assert row[0] == path.relative_to(photos["folder"]).as_posix()
        expected = (scale * photos["reference"][path] @ targets.T).softmax(dim=-1)
        found = {row[i]: float(row[i + 1]) for i in range(1, len(row), 2)}
        assert all(abs(found[n] - float(p)) <= 1e-4 for n, p in zip(names, expected))


@pytest.mark.slow
def test_eval_curate_and_the_training_callback(photos):
    """Retrieval, zero-shot, WiSE-FT and curate encode through encode_images / encode_set with clip.pipeline; the
    training callback builds its pipeline over the training model's tower: the same features and metrics."""
    from utils.callbacks import EvalCallback
    from utils.eval.encode import caption_index, encode_captions, encode_images, score

    model, folder = photos["model"], photos["folder"]
    entries = [{"image": p.relative_to(folder).as_posix(), "caption": [f"photo {i}", f"picture {i}"]}
               for i, p in enumerate(photos["readable"])]
    features = encode_images(model.pipeline, entries, folder, batch_size=2, threads=2, progress=False)
    _close(features, [photos["reference"][p] for p in photos["readable"]])
    texts = encode_captions(model.net, caption_index(entries)[0], model.tokenizer, 2, model.device, progress=False)
    expected = score(entries, torch.stack([photos["reference"][p] for p in photos["readable"]]), texts)
    callback = EvalCallback(entries, folder, model.transform, model.tokenizer, 2, 2, model.device, torch.float32,
                            period=1)
    found = callback(model.net)
    assert found.keys() == expected.keys()
    assert all(np.isclose(found[k], expected[k], atol=1e-6) for k in expected)
    # An image unreadable after the checks before the run is one line naming it, not a traceback from a worker.
    with pytest.raises(UserError, match="broken.jpg is unreadable"):
        encode_images(model.pipeline, entries + [{"image": "broken.jpg", "caption": ["x"]}], folder, 2, 0, False)


@pytest.mark.slow
def test_the_web_page_and_fast_decode_off(photos):
    from fastapi.testclient import TestClient

    from utils.predict.search import SearchIndex, encode_paths
    from utils.web.app import create_app

    model, folder = photos["model"], photos["folder"]
    index = SearchIndex(photos["tmp"] / "index", "test")
    assert index.update(folder, encode_paths(model))["unreadable"] == 1
    client = TestClient(create_app(model, index, folder), base_url="http://127.0.0.1")  # the page answers loopback Hosts only
    china = folder / "china.jpg"
    found = client.post("/api/search_image", files={"image": ("china.jpg", china.read_bytes(), "image/jpeg")},
                        data={"k": "3"}).json()["results"]
    assert found[0]["path"] == "china.jpg"
    for result in found:
        expected = float(photos["reference"][china] @ photos["reference"][folder / result["path"]])
        assert abs(result["score"] - expected) < TOLERANCE
    broken = client.post("/api/search_image", files={"image": ("broken.jpg", photos["broken"].read_bytes())})
    assert broken.status_code == 400 and "broken.jpg is not an image" in broken.json()["error"]
    # fast_decode off: the full decode, as open_image(path, None) gives it.
    full = ImagePipeline(model.net.encode_image, model.transform, fast_decode=False)
    assert full.decode_sides is None and model.pipeline.decode_sides == (64, 64)
    features, _ = full.encode([china]).all()
    with Image.open(china) as image:
        expected = F.normalize(model.detect_image_for_eval(images=[image.convert("RGB")])[0].float(), dim=-1)
    _close(features, [expected[0]])
