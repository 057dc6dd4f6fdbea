"""WiSE-FT: the blend is exact where it must be, and eval.py --eval_type wise_ft scores each blend with the same
numbers plain eval.py gives, saves the chosen blend, and refuses bad alphas and existing outputs before work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from utils.data.toy import make_toy_dataset
from nets import build_model, get_config
from tests.conftest import run_script
from utils.errors import UserError
from utils.eval.wise_ft import OUTPUT_FILES
from utils.finetune.wise_ft import check_alpha, interpolate

PHI = "tiny/VIT-T-8"


def _pair() -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(4, 5, generator=g), "half": torch.randn(7, generator=g).half(),
             "ids": torch.arange(6), "zero": torch.tensor([-0.0, 0.0, float("inf")])}
    finetuned = {"w": torch.randn(4, 5, generator=g), "half": torch.randn(7, generator=g).half(),
                 "ids": torch.arange(6), "zero": torch.tensor([1.0, -0.0, 2.0])}
    return start, finetuned


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def test_interpolate_endpoints_are_the_inputs_bit_for_bit_and_the_middle_is_the_mean_within_1e_6():
    start, finetuned = _pair()
    at0, at1, half = (interpolate(start, finetuned, a) for a in (0, 1, 0.5))
    for key in start:
        assert _bits_equal(at0[key], start[key]), key  # -0.0 and inf too
        assert _bits_equal(at1[key], finetuned[key]), key
    torch.testing.assert_close(half["w"], (start["w"] + finetuned["w"]) / 2, atol=1e-6, rtol=0)
    # fp16 is blended in fp32 and rounded once.
    assert _bits_equal(half["half"], ((start["half"].float() + finetuned["half"].float()) / 2).half())
    assert _bits_equal(half["ids"], start["ids"]) and half["ids"].data_ptr() != finetuned["ids"].data_ptr()
    quarter = interpolate(start, finetuned, 0.25)["w"]
    torch.testing.assert_close(quarter, 0.75 * start["w"] + 0.25 * finetuned["w"], atol=1e-6, rtol=0)
    assert _bits_equal(start["w"], _pair()[0]["w"])  # the inputs are not modified


@pytest.mark.parametrize("change, problem", [
    (lambda d: d.pop("w"), "1 keys only in b.pth (first: w)"),
    (lambda d: d.update(w=torch.zeros(5, 4)), "1 shapes differ (first: w (5, 4) vs (4, 5))"),
    (lambda d: d.update(ids=torch.arange(6) + 1), "1 integer tensors differ (first: ids)"),
    (lambda d: d.update(ids=torch.arange(6.0)), "1 tensors are floating point in one file only (first: ids)"),
])
def test_mismatched_state_dicts_are_one_line_naming_both_files(change, problem):
    start, finetuned = _pair()
    change(start)
    with pytest.raises(UserError) as error:
        interpolate(start, finetuned, 0.5, names=("a.pth", "b.pth"))
    message = str(error.value)
    assert "\n" not in message and message.startswith("a.pth and b.pth are not one architecture") and problem in message


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_check_alpha_names_the_setting(alpha):
    with pytest.raises(UserError, match=r"^wise_ft_alpha must be a number from 0 .* to 1 .*, got "):
        check_alpha(alpha, "wise_ft_alpha")
    assert check_alpha(0, "x") == 0.0 and check_alpha(1, "x") == 1.0


def _weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save(build_model(get_config(PHI)).state_dict(), path)
    return path


def _eval(capsys, *args, **settings):
    flags = [x for k, v in settings.items() for x in (f"--{k}", *(map(str, v) if isinstance(v, list) else [str(v)]))]
    result = run_script("eval.py", "--phi", PHI, "--num_workers", "0", "--batch_size", "64", *args, *flags,
                        capsys=capsys)
    return result


@pytest.fixture
def data(tmp_path):
    """Toy images (val: the fine-tuning set, train: the retrieval control) and two tiny weight files."""
    make_toy_dataset(tmp_path / "toy", n_train=5, n_val=5, seed=4)
    return {"root": tmp_path, "toy": tmp_path / "toy", "start": _weights(tmp_path / "start.pth", 0),
            "tuned": _weights(tmp_path / "tuned.pth", 1)}


def _sweep(capsys, data, save_dir: Path, *args, **settings):
    return _eval(capsys, "--eval_type", "wise_ft", "--wise_ft_start_path", data["start"],
                 "--model_path", data["tuned"], "--datasets_path", data["toy"],
                 "--datasets_val_json_path", data["toy"] / "en_val.json", "--wise_ft_save_dir", save_dir,
                 *args, **settings)


def _retrieval(capsys, data, weights: Path, json_name: str, out: str, **settings) -> dict:
    result = _eval(capsys, "--model_path", weights, "--datasets_path", data["toy"],
                   "--datasets_val_json_path", data["toy"] / json_name, "--output", data["root"] / out,
                   "--cache_dir", data["root"] / "cache", **settings)
    assert result.returncode == 0, result.stderr[-2000:]
    return {"metrics": json.loads((data["root"] / out).read_text())["metrics"], "stdout": result.stdout}


@pytest.mark.slow
def test_sweep_rows_equal_plain_eval_and_the_chosen_blend_is_saved(data, capsys):
    save_dir = data["root"] / "sweep"
    result = _sweep(capsys, data, save_dir, wise_ft_alphas=[1, 0, 0.5], control_type="retrieval",
                    control_datasets_path=data["toy"], control_json_path=data["toy"] / "en_train.json")
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((save_dir / OUTPUT_FILES["results"]).read_text())
    rows = {row["alpha"]: row for row in results["rows"]}
    assert list(rows) == [0.0, 0.5, 1.0]
    assert "fine-tune r_mean" in result.stdout and "control r_mean" in result.stdout
    # The endpoints are the two files: their rows are plain eval.py's numbers on the val set, and on the control
    # set (one endpoint: the control goes through the same code).
    for alpha, weights in ((0.0, data["start"]), (1.0, data["tuned"])):
        plain = _retrieval(capsys, data, weights, "en_val.json", f"{alpha}_val.json")["metrics"]
        assert rows[alpha]["val"] == pytest.approx(plain, abs=1e-9), alpha
    control = _retrieval(capsys, data, data["tuned"], "en_train.json", "control.json")["metrics"]
    assert rows[1.0]["control"] == pytest.approx(control, abs=1e-9)
    assert rows[1.0]["selection"] == pytest.approx((control["r_mean"] + rows[1.0]["val_score"]) / 2)
    chosen = results["chosen_alpha"]
    assert chosen == max(rows, key=lambda a: (rows[a]["selection"], -a))
    assert f"chosen alpha {chosen:g}:" in result.stdout
    saved = torch.load(save_dir / OUTPUT_FILES["weights"], weights_only=True)
    expected = interpolate(torch.load(data["start"], weights_only=True), torch.load(data["tuned"], weights_only=True),
                           chosen)
    assert list(saved) == list(expected) and all(_bits_equal(saved[k], expected[k]) for k in expected)
    assert (save_dir / OUTPUT_FILES["plot"]).read_bytes()[:4] == b"\x89PNG"

    # A blend saved by a one-alpha sweep is its own weights to the feature cache (keyed by the file's bytes), not
    # the cached features of either file it came from, and scores as its sweep row did.
    only = data["root"] / "half"
    assert _sweep(capsys, data, only, wise_ft_alphas=[0.5]).returncode == 0
    blend = _retrieval(capsys, data, only / OUTPUT_FILES["weights"], "en_val.json", "blend.json")
    assert "using cached features" not in blend["stdout"]
    assert blend["metrics"] == pytest.approx(rows[0.5]["val"], abs=1e-9)


@pytest.mark.slow
def test_a_zeroshot_control_scores_as_eval_zeroshot(data, capsys):
    tree = data["root"] / "classes"
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 40, 220))):
        (tree / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 40), tuple(max(0, c - 30 * i) for c in colour)).save(tree / name / f"{i}.png")
    save_dir = data["root"] / "sweep"
    result = _sweep(capsys, data, save_dir, wise_ft_alphas=[0], control_type="zeroshot",
                    control_datasets_path=tree, templates="a photo of a {c}.")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "control acc1" in result.stdout
    [row] = json.loads((save_dir / OUTPUT_FILES["results"]).read_text())["rows"]
    plain = _eval(capsys, "--eval_type", "zeroshot", "--model_path", data["start"], "--datasets_path", tree,
                  "--datasets_val_json_path", data["root"] / "none.json", "--templates", "a photo of a {c}.",
                  "--feature_cache", "false", "--output", data["root"] / "zs.json")
    assert plain.returncode == 0, plain.stderr[-2000:]
    metrics = json.loads((data["root"] / "zs.json").read_text())["metrics"]
    assert row["control"] == pytest.approx(metrics, abs=1e-9)
    assert row["control_score"] == pytest.approx(100 * metrics["acc1"])


@pytest.mark.parametrize("alphas, message", [
    (["0.5", "-0.5"], "error: --wise_ft_alphas must be one or more numbers from 0 to 1, got [0.5, -0.5]"),
    (["0", "1.5"], "error: --wise_ft_alphas must be one or more numbers from 0 to 1, got [0.0, 1.5]"),
    ([], "error: --wise_ft_alphas needs at least one value"),
])
def test_alphas_outside_0_1_are_one_line_and_exit_2_before_any_work(data, capsys, alphas, message):
    save_dir = data["root"] / "sweep"
    result = _sweep(capsys, data, save_dir, "--wise_ft_alphas", *alphas)
    assert result.returncode == 2 and result.stderr.strip() == message and not save_dir.exists()


def test_existing_outputs_are_never_replaced_without_overwrite(data, capsys):
    save_dir = data["root"] / "sweep"
    save_dir.mkdir()
    (save_dir / OUTPUT_FILES["plot"]).write_bytes(b"mine")
    result = _sweep(capsys, data, save_dir)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "wise_ft.png already exists; choose another wise_ft_save_dir, or pass --overwrite true to replace it" \
        in result.stderr
    assert sorted(p.name for p in save_dir.iterdir()) == [OUTPUT_FILES["plot"]]
    assert (save_dir / OUTPUT_FILES["plot"]).read_bytes() == b"mine"
    missing = _sweep(capsys, data, save_dir, "--wise_ft_start_path", data["root"] / "nope.pth")
    assert missing.returncode == 2 and "wise_ft_start_path" in missing.stderr and missing.stderr.count("\n") == 1
