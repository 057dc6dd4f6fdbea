"""A ResNet CLIP (tiny/RN-T) through the product: training with BatchNorm statistics frozen or not, eval
(retrieval, zero-shot), predict and search, the web page, locks, LoRA and ONNX."""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from utils.data.toy import make_toy_dataset
from nets import build_model, get_config
from tests.conftest import run_script
from tests.test_eval import run_eval
from tests.test_resnet import perturb_
from tests.test_training import train, train_args

ROOT = Path(__file__).resolve().parents[1]


def _running_stats(state_dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if k.endswith(("running_mean", "running_var"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(root, start weights, recall the training run's EvalCallback reported): tiny/RN-T fine-tuned from
    weights whose BatchNorm statistics are not a fresh init's, for one epoch with freeze_bn_stats left at auto."""
    root = tmp_path_factory.mktemp("rn")
    make_toy_dataset(root / "toy", n_train=16, n_val=8, seed=2)
    torch.manual_seed(0)
    start = perturb_(build_model(get_config("tiny/RN-T")))
    torch.save(start, root / "start.pth")
    result = train(train_args(root / "toy", root / "run", model_path=root / "start.pth", phi="auto", Epoch=1,
                              eval_period=1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "phi=tiny/RN-T" in result.stdout and "BatchNorm statistics: frozen as loaded" in result.stdout
    history = json.loads(next((root / "run").glob("loss_*/history.jsonl")).read_text().splitlines()[-1])
    return root, start, history


@pytest.mark.slow
def test_fine_tuning_keeps_batch_norm_statistics_unless_told(trained, capsys):
    root, start, _ = trained
    tuned = torch.load(root / "run" / "last_epoch_weights.pth", weights_only=True)
    for key, value in _running_stats(start).items():
        assert torch.equal(tuned[key], value), key
    # The gains and the convolutions did train.
    assert not torch.equal(tuned["visual.layer1.0.bn3.weight"], start["visual.layer1.0.bn3.weight"])
    assert not torch.equal(tuned["visual.conv1.weight"], start["visual.conv1.weight"])
    updated = train(train_args(root / "toy", root / "updated", model_path=root / "start.pth", phi="auto", Epoch=1,
                               eval_flag="false", freeze_bn_stats="false", wise_ft_alpha=0.5), capsys)
    assert updated.returncode == 0, updated.stderr[-3000:]
    assert "BatchNorm statistics: updated by every batch" in updated.stdout
    moved = torch.load(root / "updated" / "last_epoch_weights.pth", weights_only=True)
    assert all(not torch.equal(moved[k], v) for k, v in _running_stats(start).items())
    # WiSE-FT blends the statistics too; BatchNorm's batch counters (now apart) are the fine-tuned ones.
    blend = torch.load(root / "updated" / "wise_ft_alpha0.5_weights.pth", weights_only=True)
    key = "visual.layer1.0.bn1.running_mean"
    torch.testing.assert_close(blend[key], (start[key] + moved[key]) / 2)
    assert blend["visual.bn1.num_batches_tracked"] == moved["visual.bn1.num_batches_tracked"] > 0


@pytest.mark.slow
def test_eval_retrieval_equals_the_training_callback_and_zero_shot_runs(trained, tmp_path, capsys):
    from tests.test_zeroshot import _eval, _folder_tree

    root, _, history = trained
    run_eval(root)
    saved = json.loads((root / "result.json").read_text())
    assert saved["phi"] == "tiny/RN-T" and saved["images"] == 8
    for key in ("txt_r1", "img_r1", "txt_mean_rank"):
        assert saved["metrics"][key] == pytest.approx(history[key], abs=1e-9), key
    _folder_tree(tmp_path / "classes")
    result = _eval(capsys, model_path=root / "run" / "last_epoch_weights.pth", datasets_path=tmp_path / "classes",
                   templates="a photo of {c}.", datasets_val_json_path=tmp_path / "none.json",
                   output=tmp_path / "zs.json", feature_cache="false")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "zs.json").read_text())["images"] == 7


@pytest.mark.slow
def test_predict_and_search_with_a_resnet(trained, tmp_path, capsys):
    from clip import CLIP

    weights = trained[0] / "run" / "last_epoch_weights.pth"
    example = ROOT / "img" / "example.jpg"
    once = run_script("predict.py", "--model_path", weights, "--phi", "auto", "--image", example, "--captions",
                      "a red circle", "a blue square", capsys=capsys)
    assert once.returncode == 0, once.stderr[-2000:]
    printed = {caption: float(p) for p, caption in re.findall(r"(\d\.\d{4})  (.+)$", once.stdout, re.M)}
    captions = ["a red circle", "a blue square"]
    expected = CLIP(model_path=str(weights), phi="auto", cuda=False).detect_image(Image.open(example), captions)
    assert [printed[c] for c in captions] == pytest.approx(expected[0].tolist(), abs=1e-4)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate([(200, 20, 20), (20, 200, 20), (20, 20, 200)]):
        Image.new("RGB", (48, 48), colour).save(photos / f"{i}.png")
    code, out, err = run_script("predict.py", "--mode", "search", "--model_path", weights, "--phi", "auto",
                                "--dir_origin_path", photos, "--index_dir", tmp_path / "index", "--top_k", 2,
                                "--query", photos / "1.png", capsys=capsys)
    assert code == 0, err[-2000:]
    score, path = out.splitlines()[1].split("  ", 1)
    assert path == str(photos / "1.png") and float(score) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_web_classify_with_a_resnet(trained, tmp_path):
    import uvicorn

    from clip import CLIP
    from tests.conftest import free_port
    from tests.test_web import _post
    from utils.web import app as web

    model = CLIP(model_path=str(trained[0] / "run" / "last_epoch_weights.pth"), phi="auto", cuda=False)
    Image.new("RGB", (48, 48), (210, 20, 20)).save(tmp_path / "red.png")
    port = free_port()
    app = web.create_app(model, templates="a photo of a {c}.")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.1)
        status, body = _post(f"http://127.0.0.1:{port}/api/classify", {"texts": "red thing\nblue thing",
                                                                       "kind": "labels"},
                             {"image": ("red.png", (tmp_path / "red.png").read_bytes())})
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    expected = model.classify(Image.open(tmp_path / "red.png"), model.class_embeddings(["red thing", "blue thing"],
                                                                                       "a photo of a {c}."))[0]
    assert status == 200 and body["probs"] == pytest.approx(expected.tolist(), abs=1e-5)


def test_resnet_lock_groups_are_stem_stages_and_pool():
    from utils.finetune.partial import apply_locks, vision_groups

    model = build_model(get_config("tiny/RN-T"))
    assert len(vision_groups(model.visual)) == 6  # stem, layer1..layer4, attnpool
    cfg = dict(lock_image=True, lock_image_unlocked_groups=2, lock_text=True, lock_text_unlocked_layers=0,
               lock_layer_norm=True)
    apply_locks(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"logit_scale"} | {n for n, _ in model.named_parameters()
                                           if n.startswith(("visual.layer4.", "visual.attnpool."))}
    apply_locks(model, dict(cfg, lock_image_unlocked_groups=0, lock_layer_norm=False))
    visual = {n for n, p in model.visual.named_parameters() if p.requires_grad}
    assert "bn1.weight" in visual and "layer2.0.downsample.1.bias" in visual
    assert all(re.search(r"(^|\.)(bn\d|downsample\.1)\.(weight|bias)$", n) for n in visual)


def test_lora_adapts_only_the_attention_pool_of_a_resnet_tower():
    from utils.finetune.lora import add_lora

    model = build_model(get_config("tiny/RN-T"))
    add_lora(model, dict(lock_image=False, lock_text=True, lora_r=2, lora_alpha=4, lora_dropout=0.0,
                         lora_targets=["attn"]))
    adapted = {n.rsplit(".lora_", 1)[0] for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert adapted == {f"visual.attnpool.{name}" for name in ("q_proj", "k_proj", "v_proj", "c_proj")}


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 7])
def test_resnet_image_tower_in_onnxruntime_within_1e4(resnet_session, batch):
    net, sess = resnet_session
    pixels = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
    from utils.export.onnx_export import run_session

    with torch.no_grad():
        expected = net.encode_image(pixels).numpy()
    assert abs(run_session(sess, pixels.numpy()) - expected).max() < 1e-4


@pytest.fixture(scope="module")
def resnet_session():
    from utils.export.onnx_export import session
    from nets.onnx_towers import encoders, export_tower

    torch.manual_seed(0)
    net = build_model(get_config("tiny/RN-T")).eval()
    perturb_(net)
    return net, session(export_tower(encoders(net)["image"], torch.float32))
