"""Every command the project prints, shows in --help or documents runs as printed, on a fresh clone after the demo.

The clone is a folder laid out as a checkout (img/, model_data/, datasets/toy/) where `train.py --demo en` has run;
commands run in it as the command line runs them (tests/conftest.run_script), under umask 0022, and every file
they write must then be readable by others (mode 0644). One test per command, in the order the commands build on
each other (eval's help examples use train's fine-tuned weights; predict_onnx uses export_onnx's folder), so one
failing command does not hide the others. The documented commands are the code blocks of README.md and docs/*.md:
each runs, or is listed in SKIPPED with the reason it cannot run here (a download, a GPU, several processes, data
this clone does not have); a documented command in neither place fails."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import stat
import sys
from pathlib import Path

import pytest

from utils.data.toy import make_toy_dataset
from tests.conftest import run_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train.py", "eval.py", "predict.py", "datasets/convert.py", "datasets/curate.py")
PAGES = ("README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")))
PROGRAMS = ("python ", "torchrun ", "curl ", "bash ", "tensorboard ", "pip ", "$ ")
DEMO_WEIGHTS = ("--model_path", "logs/demo_en/last_epoch_weights.pth", "--phi", "auto")

DOWNLOAD = "downloads weights by name (tests/test_download.py covers names against a local server)"
SKIPPED = {  # documented command -> why it cannot run here
    "pip install -r requirements.txt && python train.py --demo en":
        "installs from the network; the module's fixture runs the demo, shortened",
    "pip install -r requirements.txt && python -m pytest -q -n 2 --dist loadfile": "the whole suite, this test among it",
    "python -m pytest -q -n 2 --dist loadfile": "the whole suite, this test among it",
    "python -m pytest -q": "the whole suite, this test among it",
    "python -m pytest -q -m 'not slow'": "most of the suite (tests/test_suite_settings.py runs it on a planted folder)",
    "python -m pytest -q --lf": "the suite's last failures (tests/test_suite_settings.py runs it on a planted folder)",
    "python eval.py --model_path logs/demo_en/last_epoch_weights.pth --phi tiny/VIT-T-8 --datasets_path "
    "datasets/toy/ --datasets_val_json_path datasets/toy/en_val.json":
        "the demo's printed eval line, run by test_the_demos_next_steps (a second run is refused: its result exists)",
    "tensorboard --logdir logs/demo_en": "not ours; test_the_demo_says_what_it_wrote checks its folder exists",
    "python datasets/curate.py --datasets_path datasets/flickr8k --input datasets/flickr8k/flickr8k_train.json "
    "--output datasets/flickr8k/flickr8k_train_kept.json --against datasets/flickr8k/flickr8k_val.json "
    "--model_path model_data/ViT-B-32-OpenAI.pth --phi openai/VIT-B-32 --min_clip_score 0.28":
        "needs Flickr8k and OpenAI's weight file (tests/test_curate.py runs curate on the toy set)",
    "python train.py --datasets_path datasets/ --datasets_train_json_path datasets/en_train.json "
    "--datasets_val_json_path datasets/en_val.json": "needs Flickr8k in the original's layout",
    "python datasets/convert.py --source karpathy --input dataset_flickr8k.json --images Flicker8k_Dataset/ "
    "--output_dir datasets/flickr8k --name flickr8k": "needs Flickr8k and Karpathy's split file",
    "python datasets/convert.py --source coco --input annotations/captions_train2017.json --images train2017/ "
    "--output_dir datasets/coco --name coco --val_ratio 0.01": "needs COCO",
    "python datasets/convert.py --source flickr8k --input Flickr8k_text/Flickr8k.token.txt "
    "--images Flicker8k_Dataset/ --output_dir datasets/flickr8k --name flickr8k": "needs the Flickr8k text release",
    "python datasets/convert.py --source cn-clip --input MUGE/ --phi cn-clip/VIT-B-16 --output_dir datasets/muge "
    "--name muge": "needs Chinese-CLIP's MUGE release",
    "python datasets/convert.py --source wds --input 'shards/{00000..00009}.tar' --output_dir datasets/web "
    "--name web": "needs ten shards of the user's (tests/test_convert.py reads shards)",
    "python datasets/convert.py --source karpathy --input dataset_flickr8k.json --images Flicker8k_Dataset/ "
    "--output_dir datasets/flickr8k_shards --name f8k --to wds --shard_size 1000": "needs Flickr8k",
    "torchrun --nproc_per_node 4 train.py --distributed true --datasets_path datasets/flickr8k/ "
    "--datasets_train_json_path 'datasets/flickr8k_shards/f8k_train/{00000..00005}.tar' "
    "--datasets_val_json_path datasets/flickr8k/flickr8k_val.json --num_workers 2":
        "four processes and Flickr8k's shards (tests/test_stream.py trains on shards with two gloo processes)",
    "python predict.py --mode embed --caption_file train.json --datasets_path data/ --embeddings_dir emb/":
        "needs the user's train.json and data/ (tests/test_embed.py embeds caption files)",
    "torchrun --nproc_per_node 4 predict.py --mode embed --distributed true "
    "--caption_file 'shards/{00000..00127}.tar' --embeddings_dir emb/":
        "four processes and 128 shards (tests/test_embed.py runs gloo processes)",
    "python predict.py --mode export_onnx ... --export_fp16 true":
        "a template: ... stands for the line above's settings",
    "python train.py --batch_size 256 --accum_freq 8 ...": "a template: ... stands for the user's settings",
    "torchrun --nproc_per_node 4 train.py --distributed true --batch_size 256 ...": "a template, four processes",
    "torchrun --nnodes 2 --nproc_per_node 4 --node_rank 0 --master_addr 10.0.0.1 --master_port 29500 "
    "train.py --distributed true ...": "a template, two machines",
    "python train.py --resume logs/state_step00000002.pt --phi openai/VIT-B-16 --batch_size 16 ...":
        "a template; tests/test_savedir.py checks these resume messages",
    "python train.py --resume logs/state_step00000002.pt --phi openai/VIT-B-16 --batch_size 16 --resume_force true "
    "...": "a template; tests/test_savedir.py checks these resume messages",
    "curl -F image=@img/example.jpg -F $'texts=circle\\nsquare' http://127.0.0.1:7860/api/classify":
        "needs the page serving; tests/test_web.py calls these endpoints",
    "curl 'http://127.0.0.1:7860/api/search?q=a%20red%20circle&k=5'":
        "needs the page serving; tests/test_web.py calls these endpoints",
    "python predict.py --phi openai/VIT-B-32 --model_path openai": DOWNLOAD,
    "python predict.py --phi ViT-B-32 --model_path laion2b_s34b_b79k": DOWNLOAD,
    "python predict.py --phi auto --model_path hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K": DOWNLOAD,
    "python predict.py --phi auto --model_path hf-hub:openai/clip-vit-base-patch32": DOWNLOAD,
    "python predict.py --phi auto --model_path https://example.org/w.pt#sha256=<64 hex digits>": DOWNLOAD,
    "python eval.py --eval_type wise_ft --phi auto --wise_ft_start_path logs/demo_en/last_epoch_weights.pth "
    "--model_path logs/mine/last_epoch_weights.pth --datasets_path datasets/mine/ "
    "--datasets_val_json_path datasets/mine/mine_val.json --control_type retrieval --control_datasets_path "
    "datasets/toy/ --control_json_path datasets/toy/en_val.json --wise_ft_alphas 0 0.25 0.5 0.75 1 "
    "--wise_ft_save_dir logs/wise_ft": "needs a finished fine-tuning run in logs/mine (the one here stops after a "
                                       "step); eval.py's --help example of the sweep runs",
    "python eval.py --eval_type zeroshot --datasets_path my_classes/ --model_path ViT-B-32.pt --phi auto "
    "--output results.json": "needs OpenAI's ViT-B-32.pt and the user's classes; eval.py's --help example runs "
                             "zero-shot on the toy set",
    "python predict.py --model_path ViT-B-32.pt --phi auto --image cat.jpg --labels cat dog 'red panda'":
        "needs OpenAI's ViT-B-32.pt",
    **{command: "downloads CoCa's weights (tests/test_caption.py runs these steps on a tiny random CoCa)" for command in (
        "python predict.py --mode caption --phi coca_ViT-L-14 --model_path mscoco_finetuned_laion2b_s13b_b90k "
        "--dir_origin_path my_photos/ --output my_photos/captions.json",
        "python datasets/curate.py --datasets_path my_photos/ --input my_photos/captions.json --output "
        "my_photos/captions_kept.jsonl --phi coca_ViT-L-14 --model_path laion2b_s13b_b90k --min_clip_score -1",
        "python datasets/convert.py --source jsonl --input my_photos/captions_kept.jsonl --output_dir "
        "datasets/my_photos --name my_photos --val_ratio 0.05",
        "python train.py --phi ViT-B-32 --model_path laion2b_s34b_b79k --datasets_path datasets/my_photos "
        "--datasets_train_json_path datasets/my_photos/my_photos_train.json --datasets_val_json_path "
        "datasets/my_photos/my_photos_val.json")},
}
# Documented commands that run here with more arguments, and why.
EXTRA = {
    # The second CSV conversion writes the first one's files again, which convert refuses without --overwrite.
    "python datasets/convert.py --source csv --input captions.csv --image_column filepath --caption_column title "
    "--output_dir datasets/mine --name mine": ("--overwrite", "true"),
    "python datasets/convert.py --source jsonl --input captions.jsonl --output_dir datasets/mine --name mine":
        ("--overwrite", "true"),
    "python datasets/convert.py --source folder --input my_photos/ --output_dir datasets/mine --name mine "
    "--resize 256": ("--overwrite", "true"),
    # model_path's default is OpenAI's ViT-B/32, a download: the demo's weights stand in (in all three, as the
    # search refuses weights other than the embeddings').
    "python predict.py --mode embed --dir_origin_path my_photos/ --embeddings_dir emb/": DEMO_WEIGHTS,
    "python predict.py --mode search --index_dir idx/ --query 'a dog on a beach' --top_k 5": DEMO_WEIGHTS,
    "python predict.py --mode web --index_dir idx/": DEMO_WEIGHTS,
}
# docs/data.md, "Bring your own data": captions as CSV, converted; the page shows the line convert prints, which
# trains on them from the demo's weights.
CSV_CONVERSION = "python datasets/convert.py --source csv --input captions.csv --output_dir datasets/mine --name mine"


def commands(text: str, programs: tuple[str, ...] = ("python ",)) -> list[list[str]]:
    """The commands in printed text that start with one of `programs`, continuation lines joined, comments
    dropped."""
    return [shlex.split(line, comments=True) for line in _joined(text.splitlines(), programs)]


def _joined(lines, programs) -> list[str]:
    found, current = [], None
    for line in lines:
        stripped = line.strip()
        if current is None and stripped.startswith(programs):
            current = ""
        if current is not None:
            current += " " + stripped.rstrip("\\").strip()
            if not stripped.endswith("\\"):
                found.append(current.strip())
                current = None
    return found


def documented(page: str) -> list[tuple[str, list[str]]]:
    """(the command as written, without comments, continuation lines joined; the lines shown after a `$ `
    transcript's command) for each command in a page's code blocks (fenced, or indented by 4 spaces)."""
    found, fence, block = [], False, []

    def close():
        for i, line in enumerate(block):
            if not line.strip().startswith(PROGRAMS):
                continue
            [joined] = _joined(block[i:], PROGRAMS)[:1]
            joined = re.sub(r"\s+#\s.*$", "", joined)  # a comment after the command; `#sha256=` stays
            shown = []
            if joined.startswith("$ "):
                rest = block[i + 1:]
                shown = rest[:next((k for k, s in enumerate(rest) if s.strip().startswith("$ ")), len(rest))]
            command = joined.removeprefix("$ ")
            if not any(mark in command for mark in (" && ", "...", "$'", "<")):  # templates stay as written
                command = shlex.join(shlex.split(command))
            found.append((command, shown))
        block.clear()

    for line in (ROOT / page).read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            close()
        elif fence or line.startswith("    ") or (block and not line.strip()):
            block.append(line)
        else:
            close()
    close()
    return found


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A checkout's layout with the demo run in it: (folder, the demo's output), and the user's files the pages'
    examples name (my_photos/ with a caption .txt beside each image, captions.csv, captions.jsonl), made from the
    toy set. The current directory and the umask (0022) are this module's while it runs."""
    folder = tmp_path_factory.mktemp("clone")
    for shipped in ("img", "model_data"):  # read-only files as a clone has them; outputs beside them are real
        (folder / shipped).mkdir()
        for path in (ROOT / shipped).iterdir():
            if path.is_file():
                (folder / shipped / path.name).symlink_to(path)
    # The toy set as the demo generates it, smaller: 64 training images are one batch of the default size.
    make_toy_dataset(folder / "datasets" / "toy", n_train=64, n_val=8, seed=1)
    cwd, umask = Path.cwd(), os.umask(0o022)
    os.chdir(folder)
    try:
        demo = run_script("train.py", "--demo", "en", "--Epoch", "1", "--batch_size", "16", "--num_workers", "0",
                          threads=1)
        assert demo.returncode == 0, demo.stderr[-3000:]
        assert "Warning" not in demo.stderr, demo.stderr[-3000:]
        entries = [e for split in ("train", "val") for e in
                   json.loads(Path(f"datasets/toy/en_{split}.json").read_text())]
        with open("captions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filepath", "title"])
            for entry in entries:
                writer.writerow([f"datasets/toy/{entry['image']}", entry["caption"][0]])
        Path("captions.jsonl").write_text("".join(
            json.dumps({"image": f"datasets/toy/{e['image']}", "caption": e["caption"][0]}) + "\n" for e in entries))
        Path("my_photos").mkdir()
        for entry in entries[:24]:
            source = Path("datasets/toy") / entry["image"]
            name = source.name if entry in entries[:16] else f"v{source.name}"
            (Path("my_photos") / name).write_bytes(source.read_bytes())
            (Path("my_photos") / name).with_suffix(".txt").write_text("\n".join(entry["caption"]) + "\n")
        yield folder, demo.stdout
    finally:
        os.chdir(cwd)
        os.umask(umask)


@pytest.fixture
def serving(monkeypatch):
    """uvicorn's Server.run records the port of the socket it was handed instead of serving: for `mode web`
    serving is the end."""
    import uvicorn

    served = []

    def record(server, sockets=None):
        served.append({"port": sockets[0].getsockname()[1]})
        sockets[0].close()

    monkeypatch.setattr(uvicorn.Server, "run", record)
    return served


def _run(command: list[str], monkeypatch, *extra: str, expect: int = 0):
    assert command[0] == "python" and command[1] in SCRIPTS, command
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # the loops of predict and search end at once
    result = run_script(command[1], *command[2:], *extra, threads=1)
    assert result.returncode == expect, (shlex.join(command), result.stdout[-1500:], result.stderr[-3000:])
    return result


def _help_examples() -> list[list[str]]:
    """Each script's --help examples, in the order they build on each other."""
    found = []
    for script in SCRIPTS:
        shown = run_script(script, "--help")
        assert shown.returncode == 0, script
        examples = commands(shown.stdout.split("\noptions:")[0])
        assert examples, script
        found += examples
    return found


HELP_EXAMPLES = _help_examples()
TEMPLATES = [c for c in HELP_EXAMPLES if any("<" in part for part in c)]  # <...>: the user's own files


def _help_param(command):
    reason = ("the demo is the module fixture's run" if command[1:3] == ["train.py", "--demo"] else
              "a template: <...> stands for the user's own files" if command in TEMPLATES else None)
    return pytest.param(command, id=shlex.join(command)[:90], marks=[pytest.mark.skip(reason=reason)] if reason else [])


@pytest.mark.slow
@pytest.mark.parametrize("command", [_help_param(c) for c in HELP_EXAMPLES])
def test_each_help_example_runs(clone, monkeypatch, serving, command):
    _run(command, monkeypatch)
    if command[1:4] == ["predict.py", "--mode", "web"]:
        assert serving and serving[0]["port"] == 7860


def test_the_help_templates_are_the_ones_known():
    assert len(TEMPLATES) == 4 and all(c[1] in ("eval.py", "datasets/convert.py") for c in TEMPLATES)


@pytest.mark.slow
def test_search_and_web_share_one_index_per_folder(clone):
    # The help examples' search and web indexed img/ into one index of their own, keyed by the folder.
    assert [p.name[:4] for p in Path("logs/search_index").iterdir()] == ["img_"]


@pytest.mark.slow
def test_the_demo_says_what_it_wrote(clone):
    # The demo says what it wrote, then its next steps with this run's paths and real captions (tensorboard is
    # not ours: its folder must exist).
    _, demo_output = clone
    log_dir = next(Path("logs/demo_en").glob("loss_*"))
    assert "written: weights logs/demo_en/last_epoch_weights.pth" in demo_output
    assert f"log folder {log_dir}/ (epoch_loss.png, epoch_recall.png," in demo_output
    board = demo_output.split("next:\n")[1].strip().splitlines()[-1].split()
    assert board == ["tensorboard", "--logdir", "logs/demo_en"] and Path(board[2]).is_dir()


@pytest.mark.slow
def test_the_demos_next_steps(clone, monkeypatch):
    steps = commands(clone[1].split("next:\n")[1])
    assert [c[1] for c in steps] == ["predict.py", "eval.py"]
    predict, evaluate = steps
    assert len(predict[predict.index("--captions") + 1:]) == 3
    assert len(_run(predict, monkeypatch).stdout.splitlines()) == 3  # one probability per caption
    assert "r_mean" in _run(evaluate, monkeypatch).stdout


DOCUMENTED = [(page, command, shown) for page in PAGES for command, shown in documented(page)]


def _doc_param(page, command, shown):
    reason = SKIPPED.get(command)
    if reason is None and command in {shlex.join(c) for c in HELP_EXAMPLES}:
        reason = "the same line as a --help example, which test_each_help_example_runs runs"
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(command, shown, id=f"{page}: {command[:80]}", marks=marks)


@pytest.mark.slow
@pytest.mark.parametrize("command, shown", [_doc_param(*entry) for entry in DOCUMENTED])
def test_each_documented_command_runs(clone, monkeypatch, serving, command, shown):
    """A `$ ` transcript must print the lines shown after it (at 120 columns; "..." stands for lines left out)
    and exit 2 when it shows an error; any other command must exit 0."""
    argv = shlex.split(command)
    assert argv[0] == "python" and argv[1] in SCRIPTS, (
        f"{command!r} does not run here: list it in SKIPPED with the reason")
    monkeypatch.setenv("COLUMNS", "120")
    indent = min((len(s) - len(s.lstrip()) for s in shown if s.strip()), default=0)
    expected = [s[indent:].rstrip() for s in shown if s.strip() not in ("", "...")]
    errors = any(line.startswith("error: ") for line in expected)
    result = _run(argv, monkeypatch, *EXTRA.get(command, ()), expect=2 if errors else 0)
    printed = (result.stdout + result.stderr).splitlines()
    assert [line for line in expected if line not in printed] == [], command
    if command.startswith("python predict.py --mode web"):
        assert serving
    if command == CSV_CONVERSION:
        _trains_on_its_output(result, monkeypatch)


def _trains_on_its_output(convert, monkeypatch):
    """The line convert prints is the one docs/data.md shows, and it trains on the converted set from the demo's
    weights. Cut to one step: the line keeps train.py's 100 epochs, which are the user's to choose."""
    [printed] = [line for line in convert.stdout.splitlines() if line.startswith("train with: ")]
    assert printed.strip() in (ROOT / "docs" / "data.md").read_text(encoding="utf-8")
    command = shlex.split(printed.removeprefix("train with: "))
    assert command[command.index("--model_path") + 1] == "logs/demo_en/last_epoch_weights.pth"
    _run(command, monkeypatch, "--stop_after_steps", "1")


def test_every_skipped_or_extended_command_is_still_documented():
    commands_shown = {command for _, command, _ in DOCUMENTED}
    assert [c for c in [*SKIPPED, *EXTRA] if c not in commands_shown] == []


def test_the_help_sample_is_a_transcript():
    # command-line.md's `$ python eval.py --help` is held to the real text by test_each_documented_command_runs.
    assert any(c == "python eval.py --help" and len(shown) > 10 for _, c, shown in DOCUMENTED)


@pytest.mark.slow
def test_everything_written_is_readable_by_others(clone):
    # Everything the commands wrote (weights, states, plots, results, CSV, index, WiSE-FT, ONNX) is 0644.
    folder = clone[0]
    written = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()
               and not p.is_relative_to(folder / "datasets" / "toy") and not p.is_relative_to(folder / "my_photos")
               and p.name not in ("captions.csv", "captions.jsonl")]
    kinds = {p.suffix for p in written}
    assert {".pth", ".pt", ".png", ".json", ".csv", ".safetensors", ".onnx"} <= kinds, kinds
    private = [f"{p.relative_to(folder)} {oct(stat.S_IMODE(p.stat().st_mode))}" for p in written
               if stat.S_IMODE(p.stat().st_mode) != 0o644]
    assert not private, private


def test_the_default_search_index_is_one_per_folder(tmp_path):
    from utils.predict.inputs import index_dir

    config = {"index_dir": "", "dir_origin_path": str(tmp_path / "a" / "photos")}
    first = index_dir(config)
    assert Path(first).parent == Path("logs/search_index") and Path(first).name.startswith("photos_")
    assert index_dir({**config, "dir_origin_path": str(tmp_path / "b" / "photos")}) != first  # same name, other folder
    assert index_dir({**config, "dir_origin_path": str(tmp_path / "a" / "photos") + "/"}) == first
    assert index_dir({**config, "index_dir": "mine"}) == "mine"
