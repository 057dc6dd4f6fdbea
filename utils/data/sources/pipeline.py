"""What datasets/convert.py does: read a source, split, check, write, pre-flight the result, summarise."""
from __future__ import annotations

from pathlib import Path

from utils.data.sources.records import Source
from utils.data.sources.write import SPLITS, assign_splits, summary, usable, write_json, write_shards
from utils.errors import UserError

TARGETS = ("json", "wds")


def _too_long(phi: str, bert_vocab_path: str):
    """caption -> whether it exceeds the context of phi's text tower (counting the start and end tokens); None
    where the tokenizer comes with the weights."""
    from nets.configs import get_config

    from utils.tokenizer import build_tokenizer, reads_files_beside

    text = get_config(phi).text
    if reads_files_beside(text):  # SigLIP's, CLIPA's: its files come with the weights, which convert has not
        return None
    tokenizer = build_tokenizer("bert" if text.is_bert else "openai", text.context_length,
                                bert_vocab_path if text.is_bert else None)
    room = text.context_length - 2
    # A token covers at least one byte (BPE) or character (WordPiece), so shorter captions need no tokenizing.
    measure = len if text.is_bert else (lambda caption: len(caption.encode("utf-8")))
    return lambda caption: measure(caption) > room and len(tokenizer.encode(caption)) > room


def train_command(phi: str, output_dir: Path, written: dict, name: str) -> str:
    """The train.py command for what was written, with weights that are here: the demo's (of phi's language)
    when it has run, else random ones. Every setting the default would get wrong is spelled out, so the line
    runs as printed."""
    from shlex import quote

    from nets.configs import get_config

    bert = get_config(phi).text.is_bert
    demo = Path("logs") / ("demo_cn" if bert else "demo_en") / "last_epoch_weights.pth"
    if demo.is_file():
        start, why = f"--model_path {quote(str(demo))} --phi {'tiny-cn' if bert else 'tiny'}/VIT-T-8", \
            "the demo's weights, to try the pipeline"
    else:
        start, why = f"--model_path '' --phi {quote(phi)}", "random weights"
    val = f" --datasets_val_json_path {quote(str(written['val']))}" if "val" in written else ""
    return (f"train with: python train.py {start} --datasets_path {quote(str(output_dir))} --datasets_train_json_path "
            f"{quote(str(written['train']))}{val} --save_dir {quote(str(Path('logs') / name))}\n"
            f"  (from {why}; for pretrained weights give them instead, e.g. --model_path openai --phi "
            "openai/VIT-B-32, downloaded once: README, \"Weights\")")


def convert(cfg: dict) -> dict:
    from utils.data.sources import SOURCES

    if cfg["source"] not in SOURCES:
        raise UserError(f"source {cfg['source']!r} is not one of {', '.join(SOURCES)}")
    if cfg["to"] not in TARGETS:
        raise UserError(f"to {cfg['to']!r} is not one of {', '.join(TARGETS)}")
    if not 0 <= cfg["val_ratio"] + cfg["test_ratio"] < 1 or min(cfg["val_ratio"], cfg["test_ratio"]) < 0:
        raise UserError("val_ratio and test_ratio must be 0 or more, with room left for train (sum below 1)")
    if not cfg["name"]:
        raise UserError("name must not be empty: it starts every output file name")
    # Callers from before --resize existed (tests, benchmarks) pass no resize settings: the images as they are.
    cfg = {"resize": 0, "jpeg_quality": 90, "num_workers": None, **cfg}
    if cfg["resize"] < 0 or not 1 <= cfg["jpeg_quality"] <= 100:
        raise UserError(f"resize must be 0 (keep the images) or a short side in pixels, got {cfg['resize']}; "
                        f"jpeg_quality 1 to 100, got {cfg['jpeg_quality']}")
    input_path = Path(cfg["input"])
    if not input_path.exists() and cfg["source"] != "wds":
        raise UserError(f"input {input_path} does not exist")
    output_dir = Path(cfg["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    images = Path(cfg["images"]) if cfg["images"] else (input_path if input_path.is_dir() else input_path.parent)
    source = Source(input=input_path, images=images, work_dir=output_dir / cfg["name"],
                    image_column=cfg["image_column"], caption_column=cfg["caption_column"],
                    separator=cfg["separator"])
    records = list(SOURCES[cfg["source"]](source))
    source.problems.report(f"{cfg['source']} source {input_path}", cfg["skip_malformed"])
    if not records:
        raise UserError(f"{input_path} holds no images with captions for source {cfg['source']!r}")

    splits, problems, captionless = usable(assign_splits(records, cfg["val_ratio"], cfg["test_ratio"], cfg["seed"]))
    if not any(splits.values()):
        raise UserError(f"none of the {len(records)} images of {input_path} is usable:\n  " + "\n  ".join(problems[:20]))
    resized = ""
    if cfg["resize"]:
        from utils.data.sources.resize import resize_splits

        splits, resized, failed = resize_splits(splits, output_dir / f"{cfg['name']}_{cfg['resize']}px", cfg["resize"],
                                                cfg["jpeg_quality"], cfg["num_workers"])
        problems += failed
    if cfg["to"] == "json":
        written = write_json(splits, output_dir, cfg["name"], cfg["overwrite"])
        from utils.data.preflight import preflight

        for path in written.values():  # what training will read must pass what training checks
            preflight(path, output_dir, quiet=True)
    else:
        written = write_shards(splits, output_dir, cfg["name"], cfg["shard_size"], cfg["overwrite"])
    print(f"{cfg['source']} {input_path} -> {output_dir}")
    print(summary(splits, _too_long(cfg["phi"], cfg["bert_vocab_path"]), problems, captionless,
                  source.problems.empty_captions, source.problems.uncaptioned))
    if resized:
        print(f"  {resized}")
    from utils.metrics import small_val_warning  # imports torch: after the settings are checked

    if splits.get("val") and (warning := small_val_warning(len(splits["val"]), "Raise --val_ratio (or give the "
                                                                            "source a bigger val split)")):
        print(warning)
    for split in SPLITS:
        if split in written:
            target = written[split]
            shown = target if isinstance(target, Path) else f"{target[0].parent}/{{00000..{len(target) - 1:05d}}}.tar"
            print(f"  wrote {shown}")
    if cfg["to"] == "json" and "train" in written:
        print(train_command(cfg["phi"], output_dir, written, cfg["name"]))
    return {"splits": {s: len(splits[s]) for s in SPLITS}, "written": written, "problems": problems}
