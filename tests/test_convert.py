"""datasets/convert.py: every source from a fixture in its exact layout, checked entry by entry."""
from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import run_script
from utils.data.sources.pipeline import convert
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = dict(images="", val_ratio=0.0, test_ratio=0.0, seed=0, to="json", shard_size=2, image_column="filepath",
                caption_column="title", separator="", phi="tiny/VIT-T-8", skip_malformed=False, overwrite=False,
                bert_vocab_path=str(ROOT / "model_data/bert-base-chinese-vocab.txt"))


def _image(path: Path, colour=(200, 30, 30), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), colour).save(path, format=fmt)
    return path


def _convert(source: str, input: Path, out: Path, **extra) -> dict[str, list[dict]]:
    """Run the converter; returns {split: entries} of what it wrote, image paths checked to exist."""
    convert({**DEFAULTS, "source": source, "input": str(input), "output_dir": str(out), "name": "set", **extra})
    written = {}
    for split in ("train", "val", "test"):
        path = out / f"set_{split}.json"
        if path.exists():
            written[split] = json.loads(path.read_text(encoding="utf-8"))
            for entry in written[split]:
                assert (out / entry["image"]).is_file(), entry
    return written


def _error(source: str, input: Path, out: Path, **extra) -> str:
    with pytest.raises(UserError) as raised:
        _convert(source, input, out, **extra)
    return str(raised.value)


def test_karpathy_splits_restval_windows_paths_missing_images_and_empty_captions(tmp_path, capsys):
    data = tmp_path / "flickr"
    for name in ("a.jpg", "sub/dir/b.jpg", "c.jpg"):
        _image(data / "Images" / name)
    images = [
        {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A dog runs."}, {"raw": "  "}]},
        {"filename": "b.jpg", "filepath": "sub\\dir", "split": "restval", "sentences": [{"raw": "a  cat"}]},
        {"filename": "missing.jpg", "split": "val", "sentences": [{"raw": "nothing here"}]},
        {"filename": "c.jpg", "split": "test", "sentences": [{"raw": "a bird"}, {"raw": "a small bird"}]},
    ]
    annotations = data / "dataset_flickr8k.json"
    annotations.write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    out = tmp_path / "out"
    written = _convert("karpathy", annotations, out, images=str(data / "Images"))
    prefix = "../flickr/Images/"
    assert written == {"train": [{"image": prefix + "a.jpg", "caption": ["A dog runs."]},
                                 {"image": prefix + "sub/dir/b.jpg", "caption": ["a cat"]}],
                       "test": [{"image": prefix + "c.jpg", "caption": ["a bird", "a small bird"]}]}
    report = capsys.readouterr().out
    assert "images missing or unreadable, left out: 1" in report and "missing.jpg" in report
    assert "empty captions dropped: 1" in report and "exact-duplicate images: 2" in report  # one colour, same bytes
    assert "test         1 images         2 captions   captions per image min 2 / mean 2.00 / max 2" in report

    images.append({"filename": "d.jpg", "split": "train"})  # no sentences
    annotations.write_text(json.dumps({"images": images}))
    message = _error("karpathy", annotations, tmp_path / "out2", images=str(data / "Images"))
    assert f"{annotations}, images[4]: needs 'sentences'" in message and "skip_malformed" in message
    assert _convert("karpathy", annotations, tmp_path / "out3", images=str(data / "Images"), skip_malformed=True)


def test_coco_merges_an_images_captions_and_names_bad_annotations(tmp_path):
    for name in ("1.jpg", "2.jpg"):
        _image(tmp_path / "val2017" / name)
    coco = {"images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"},
                       {"id": 3, "file_name": "3.jpg"}],  # 3.jpg is missing
            "annotations": [{"image_id": 1, "caption": "a red thing"}, {"image_id": 2, "caption": "two"},
                            {"image_id": 1, "caption": "something red"}, {"image_id": 2, "caption": ""},
                            {"image_id": 3, "caption": "gone"}]}
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(coco))
    written = _convert("coco", path, tmp_path, images=str(tmp_path / "val2017"), val_ratio=0.5)
    assert sorted(written) == ["train", "val"]
    everything = written["train"] + written["val"]
    assert sorted(everything, key=lambda e: e["image"]) == [
        {"image": "val2017/1.jpg", "caption": ["a red thing", "something red"]},
        {"image": "val2017/2.jpg", "caption": ["two"]}]
    coco["annotations"].append({"image_id": 1})
    path.write_text(json.dumps(coco))
    assert "annotations[5]: needs \"image_id\" and \"caption\"" in _error("coco", path, tmp_path / "o",
                                                                          images=str(tmp_path / "val2017"))


def test_flickr8k_token_file_with_its_split_lists(tmp_path):
    for name in ("1000.jpg", "2000.jpg", "3000.jpg"):
        _image(tmp_path / "Flicker8k_Dataset" / name)
    text = tmp_path / "Flickr8k_text"
    text.mkdir()
    (text / "Flickr8k.token.txt").write_text("1000.jpg#0\tA child in pink .\n1000.jpg#1\tA girl .\n"
                                             "2000.jpg#0\tTwo dogs .\n2000.jpg#1\t \n3000.jpg#0\tA man .\n"
                                             "5000.jpg#0\tno such picture .\n")
    (text / "Flickr_8k.trainImages.txt").write_text("1000.jpg\n")
    (text / "Flickr_8k.devImages.txt").write_text("2000.jpg\n")
    (text / "Flickr_8k.testImages.txt").write_text("3000.jpg\n")
    written = _convert("flickr8k", text / "Flickr8k.token.txt", tmp_path, images=str(tmp_path / "Flicker8k_Dataset"))
    assert written == {"train": [{"image": "Flicker8k_Dataset/1000.jpg", "caption": ["A child in pink .", "A girl ."]}],
                       "val": [{"image": "Flicker8k_Dataset/2000.jpg", "caption": ["Two dogs ."]}],
                       "test": [{"image": "Flicker8k_Dataset/3000.jpg", "caption": ["A man ."]}]}
    with (text / "Flickr8k.token.txt").open("a") as f:
        f.write("4000.jpg#0 no tab here\n")
    assert f"{text / 'Flickr8k.token.txt'}, line 7: expected name.jpg#k<TAB>caption" in _error(
        "flickr8k", text / "Flickr8k.token.txt", tmp_path / "o", images=str(tmp_path / "Flicker8k_Dataset"))


def test_csv_merges_rows_accepts_windows_paths_and_lists_columns(tmp_path):
    _image(tmp_path / "imgs" / "a.jpg")
    _image(tmp_path / "imgs" / "b.png", fmt="PNG")
    table = tmp_path / "train.csv"
    table.write_text('filepath,title,source\nimgs\\a.jpg,"a red, square thing",x\nimgs/b.png,a png,x\n'
                     "imgs/a.jpg,the same red thing,x\nimgs/b.png,,x\nimgs/gone.jpg,lost,x\n")
    written = _convert("csv", table, tmp_path)
    assert written == {"train": [{"image": "imgs/a.jpg", "caption": ["a red, square thing", "the same red thing"]},
                                 {"image": "imgs/b.png", "caption": ["a png"]}]}
    message = _error("csv", table, tmp_path / "o", caption_column="caption")
    assert "has no column 'caption'; its columns are 'filepath', 'title', 'source'" in message
    tsv = tmp_path / "train.tsv"
    tsv.write_text("filepath\ttitle\nimgs/a.jpg\tred\nimgs/b.png\tone\textra\n")
    assert f"{tsv}, row 3: has 3 fields, the header has 2" in _error("csv", tsv, tmp_path / "o")


def test_folder_of_images_with_txt_captions(tmp_path, capsys):
    data = tmp_path / "data"
    _image(data / "one.jpg")
    (data / "one.txt").write_text("first caption\n\nsecond caption\n")
    _image(data / "deep" / "two.png", fmt="PNG")
    (data / "deep" / "two.txt").write_text("a png\n")
    _image(data / "three.jpg")  # no .txt
    written = _convert("folder", data, tmp_path / "out")
    assert written == {"train": [{"image": "../data/deep/two.png", "caption": ["a png"]},
                                 {"image": "../data/one.jpg", "caption": ["first caption", "second caption"]}]}
    assert "images without a .txt, left out: 1" in capsys.readouterr().out


def test_jsonl_names_a_malformed_line(tmp_path):
    _image(tmp_path / "x" / "a.jpg")
    lines = tmp_path / "set.jsonl"
    lines.write_text('{"image": "x\\\\a.jpg", "caption": "a caption"}\n\n'
                     '{"image": "x/a.jpg", "caption": ["another", ""]}\n')
    assert _convert("jsonl", lines, tmp_path) == {"train": [{"image": "x/a.jpg", "caption": ["a caption", "another"]}]}
    with lines.open("a") as f:
        f.write('{"image": "x/a.jpg", "caption": \n')
    assert f"{lines}, line 4: not valid JSON" in _error("jsonl", lines, tmp_path / "o")


def _b64(colour, fmt="JPEG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buffer, format=fmt)
    return base64.urlsafe_b64encode(buffer.getvalue()).decode()


def test_cn_clip_texts_and_base64_images_are_decoded_to_files(tmp_path):
    data = tmp_path / "MUGE"
    data.mkdir()
    (data / "train_texts.jsonl").write_text(
        '{"text_id": 1, "text": "红色的圆", "image_ids": [101]}\n{"text_id": 2, "text": "一个红色的东西", "image_ids": [101]}\n'
        '{"text_id": 3, "text": "蓝色", "image_ids": [102]}\n', encoding="utf-8")
    (data / "train_imgs.tsv").write_text(f"101\t{_b64((200, 0, 0))}\n102\t{_b64((0, 0, 200), 'PNG')}\n999\t{_b64(0)}\n")
    (data / "valid_texts.jsonl").write_text('{"text_id": 4, "text": "绿色", "image_ids": [201]}\n', encoding="utf-8")
    (data / "valid_imgs.tsv").write_text(f"201\t{_b64((0, 200, 0))}\n")
    out = tmp_path / "out"
    written = _convert("cn-clip", data, out, phi="tiny-cn/VIT-T-8")
    assert written == {"train": [{"image": "set/images/train/101.jpg", "caption": ["红色的圆", "一个红色的东西"]},
                                 {"image": "set/images/train/102.png", "caption": ["蓝色"]}],
                       "val": [{"image": "set/images/valid/201.jpg", "caption": ["绿色"]}]}
    assert Image.open(out / "set/images/train/101.jpg").getpixel((5, 5))[0] > 150
    (data / "valid_imgs.tsv").write_text(f"201\t{base64.b64encode(b'plain text, not a picture').decode()}\n")
    assert f"{data / 'valid_imgs.tsv'}, line 1: image 201: not an image" in _error("cn-clip", data, tmp_path / "o")
    (data / "valid_imgs.tsv").write_text("201\tnot base64 at all!\n")
    assert f"{data / 'valid_imgs.tsv'}, line 1: image 201: not base64" in _error("cn-clip", data, tmp_path / "o")


def _shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for extension, data in files.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_wds_shards_are_written_back_as_files(tmp_path):
    jpg = base64.urlsafe_b64decode(_b64((200, 0, 0)))
    png = base64.urlsafe_b64decode(_b64((0, 0, 200), "PNG"))
    _shard(tmp_path / "shards" / "00000.tar", [("000000001", {"jpg": jpg, "txt": b"a red square"}),
                                               ("000000002", {"png": png, "json": b'{"caption": ["blue", "a blue"]}'})])
    _shard(tmp_path / "shards" / "00001.tar", [("000000003", {"jpg": jpg, "txt": b"red again\n"})])
    written = _convert("wds", tmp_path / "shards/{00000..00001}.tar", tmp_path / "out")
    assert written == {"train": [{"image": "set/images/00000/000000001.jpg", "caption": ["a red square"]},
                                 {"image": "set/images/00000/000000002.png", "caption": ["blue", "a blue"]},
                                 {"image": "set/images/00001/000000003.jpg", "caption": ["red again"]}]}
    _shard(tmp_path / "bad" / "00000.tar", [("k", {"txt": b"caption without an image"})])
    assert f"{tmp_path / 'bad' / '00000.tar'}, sample k: no image member" in _error("wds", tmp_path / "bad",
                                                                                     tmp_path / "o")


def test_json_to_shards_and_back_is_the_same_dataset(tmp_path):
    entries = []
    for i in range(5):
        _image(tmp_path / "imgs" / f"{i}.jpg", colour=(40 * i, 10, 10))
        entries.append({"image": f"imgs/{i}.jpg", "caption": [f"caption {i}", f"another {i}"][:1 + i % 2]})
    lines = tmp_path / "set.jsonl"
    lines.write_text("\n".join(json.dumps(e) for e in entries))
    convert({**DEFAULTS, "source": "jsonl", "input": str(lines), "output_dir": str(tmp_path / "shards"), "name": "s",
             "to": "wds"})
    assert sorted(p.name for p in (tmp_path / "shards" / "s_train").iterdir()) == ["00000.tar", "00001.tar",
                                                                                  "00002.tar"]
    back = _convert("wds", tmp_path / "shards" / "s_train", tmp_path / "back")["train"]
    assert [e["caption"] for e in back] == [e["caption"] for e in entries]
    for original, copy in zip(entries, back):
        assert (tmp_path / "back" / copy["image"]).read_bytes() == (tmp_path / original["image"]).read_bytes()


def test_existing_outputs_are_never_overwritten_without_overwrite(tmp_path):
    _image(tmp_path / "a.jpg")
    lines = tmp_path / "set.jsonl"
    lines.write_text('{"image": "a.jpg", "caption": "one"}\n')
    _convert("jsonl", lines, tmp_path)
    (tmp_path / "set_train.json").write_text("[]  my own edits")
    assert "set_train.json already exists" in _error("jsonl", lines, tmp_path)
    assert (tmp_path / "set_train.json").read_text() == "[]  my own edits"
    assert _convert("jsonl", lines, tmp_path, overwrite=True)["train"][0]["caption"] == ["one"]


def test_the_script_summarises_and_says_how_to_train(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no demo has run here
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "b.jpg", colour=(1, 2, 3))
    long = " ".join(["word"] * 100)
    (tmp_path / "set.jsonl").write_text(f'{{"image": "a.jpg", "caption": ["one", "one"]}}\n'
                                        f'{{"image": "b.jpg", "caption": "{long}"}}\n')
    code, out, err = run_script("datasets/convert.py", "--source", "jsonl", "--input", tmp_path / "set.jsonl",
                                "--output_dir", tmp_path, "--name", "mine", capsys=capsys)
    assert code == 0, err
    assert "train        2 images         3 captions" in out
    assert "exact-duplicate images: 0; exact-duplicate captions: 1" in out
    assert "captions longer than the text tower's context: 1 (33.3%" in out
    assert f"train with: python train.py --model_path '' --phi openai/VIT-B-32 --datasets_path {tmp_path} " \
           f"--datasets_train_json_path {tmp_path / 'mine_train.json'} --save_dir logs/mine\n" \
           "  (from random weights" in out
    assert "warning: the validation set" not in out  # no val split at all: nothing to warn about
    code, _, err = run_script("datasets/convert.py", "--source", "excel", capsys=capsys)
    assert code == 2 and err.startswith("error: source 'excel' is not one of karpathy, coco")


def test_a_small_val_split_is_warned_about(tmp_path, capsys):
    for i in range(40):
        _image(tmp_path / f"{i}.jpg", colour=(i, 2 * i, 3 * i))
    (tmp_path / "set.jsonl").write_text("".join(f'{{"image": "{i}.jpg", "caption": "c{i}"}}\n' for i in range(40)))
    _convert("jsonl", tmp_path / "set.jsonl", tmp_path, val_ratio=0.05)
    out = capsys.readouterr().out
    assert "warning: the validation set has only 2 images, so R@1, R@5 and R@10 mean little (chance alone scores " \
           "R@10 about 100%; R@K needs at least 10 x K images, 100 for all three). Raise --val_ratio" in out


@pytest.mark.slow
def test_training_and_eval_read_jsonl_csv_and_tsv_directly(tmp_path):
    from utils.data.toy import make_toy_dataset
    from tests.test_training import step_losses, train_args
    from tests.test_training import train as run_train
    from utils.data.preflight import preflight

    toy = tmp_path / "toy"
    make_toy_dataset(toy, n_train=16, n_val=8, seed=2)
    train = json.loads((toy / "en_train.json").read_text())
    val = json.loads((toy / "en_val.json").read_text())
    with (toy / "train.csv").open("w", newline="") as f:
        import csv
        writer = csv.writer(f)
        writer.writerow(["title", "filepath"])
        for entry in train:  # one row per caption, Windows separators
            writer.writerows([caption, entry["image"].replace("/", "\\")] for caption in entry["caption"])
    (toy / "val.jsonl").write_text("\n".join(json.dumps(e, ensure_ascii=False) for e in val))
    (toy / "val.tsv").write_text("img\ttext\n" + "".join(f"{e['image']}\t{c}\n" for e in val for c in e["caption"]))
    assert preflight(toy / "train.csv", toy) == train
    assert preflight(toy / "val.jsonl", toy) == val
    assert preflight(toy / "val.tsv", toy, columns=("img", "text")) == val
    with pytest.raises(UserError, match="has no column 'filepath', 'title'; its columns are 'img', 'text'"):
        preflight(toy / "val.tsv", toy)

    result = run_train(train_args(toy, tmp_path / "run", Epoch=1, datasets_train_json_path=toy / "train.csv",
                                  datasets_val_json_path=toy / "val.jsonl"))  # in this process
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(step_losses(tmp_path / "run")) == 2  # 16 images / batch 8


def test_a_phi_whose_tokenizer_comes_with_its_weights_does_not_count_with_another(tmp_path, capsys):
    """SigLIP's (and CLIPA's) tokenizer is in its weights' files, which convert does not have: no count with BPE."""
    data = tmp_path / "data"
    _image(data / "one.jpg")
    (data / "one.txt").write_text("word " * 90 + "\n")
    _convert("folder", data, tmp_path / "out", phi="ViT-B-16-SigLIP2")
    out = capsys.readouterr().out
    assert "captions longer than the text tower's context: not counted (its tokenizer comes with the weights" in out
    _convert("folder", data, tmp_path / "out2")
    assert "captions longer than the text tower's context: 1 (100.0%" in capsys.readouterr().out
