"""The CPU demo: generate the toy set if absent, train a tiny CLIP from scratch, evaluate, predict."""
from __future__ import annotations

from pathlib import Path

from utils.errors import UserError

TOY_ROOT = "datasets/toy/"
# Settings that make a tiny CLIP learn the toy set on 2 CPU cores in minutes.
_COMMON = dict(model_path="", datasets_path=TOY_ROOT, Epoch=10, batch_size=128, Init_lr=1e-3, Min_lr=1e-5,
               scale_lr=False, warmup_ratio=0.05, weight_decay=0.1, datasets_random=False, eval_period=1000,
               save_period=1000, num_workers=1, precision="fp32", Cuda=None)
DEMO_PRESETS = {
    "en": dict(_COMMON, phi="tiny/VIT-T-8", datasets_train_json_path=TOY_ROOT + "en_train.json",
               datasets_val_json_path=TOY_ROOT + "en_val.json", save_dir="logs/demo_en"),
    # The post-LayerNorm BERT needs a longer warmup than OpenAI's pre-LayerNorm text tower.
    "cn": dict(_COMMON, phi="tiny-cn/VIT-T-8", bert_path="", warmup_ratio=0.1,
               datasets_train_json_path=TOY_ROOT + "cn_train.json",
               datasets_val_json_path=TOY_ROOT + "cn_val.json", save_dir="logs/demo_cn"),
}
EXAMPLES = {
    "en": ["a red circle", "a blue square and a yellow star", "a green triangle on the left", "a white cross"],
    "cn": ["一个红色的圆形", "一个蓝色的正方形和一个黄色的星形", "左边有一个绿色的三角形", "一个白色的十字形"],
}


def demo_config(config: dict, explicit: dict) -> dict:
    if config["demo"] not in DEMO_PRESETS:
        raise UserError(f"demo {config['demo']!r} is not one of {', '.join(DEMO_PRESETS)}")
    # The preset replaces the script defaults, but flags given on the command line still win.
    return {**config, **DEMO_PRESETS[config["demo"]], **{k: v for k, v in explicit.items() if k != "demo"}}


def run_demo(config: dict, explicit: dict) -> dict:
    import time

    from utils.data.toy import make_toy_dataset

    from utils.train.run import run_training

    cfg = demo_config(config, explicit)
    started = time.time()
    made = make_toy_dataset(cfg["datasets_path"])
    if made["generated"]:
        print(f"generated the toy dataset in {cfg['datasets_path']} ({made['seconds']:.1f} s)")
    summary = run_training(cfg, explicit)
    if summary["interrupted"]:
        raise SystemExit(128 + max(summary["interrupted"], 0))
    metrics = summary["metrics"]
    print(f"\ndemo ({cfg['demo']}): r_mean {metrics.get('r_mean', float('nan')):.2f} on the toy val split "
          f"(chance is about 1), {time.time() - started:.0f} s in all")
    entry = _predict_example(cfg, Path(cfg["save_dir"]) / "last_epoch_weights.pth")
    print(next_steps(cfg, summary, entry))
    return summary


def _predict_example(cfg: dict, weights: Path) -> dict:
    """Score the first val image against its own caption and the examples; returns that entry."""
    import json

    from clip import CLIP

    entry = json.loads(Path(cfg["datasets_val_json_path"]).read_text(encoding="utf-8"))[0]
    image_path = Path(cfg["datasets_path"]) / entry["image"]
    model = CLIP(model_path=str(weights), phi=cfg["phi"], cuda=cfg["Cuda"], precision="fp32")
    captions = [entry["caption"][0]] + EXAMPLES[cfg["demo"]]
    probs = model.detect_image(model.open_image(image_path), captions)[0]
    print(f"\npredict example: {image_path}")
    for p, caption in sorted(zip(probs, captions), key=lambda pair: -pair[0]):
        print(f"  {p:.4f}  {caption}")
    return entry


def next_steps(cfg: dict, summary: dict, entry: dict) -> str:
    """What the demo wrote and the commands to run next, with the paths and captions of this run."""
    from shlex import quote

    save_dir, log_dir = Path(summary["save_dir"]), Path(summary["log_dir"])
    weights = save_dir / "last_epoch_weights.pth"
    plots = ", ".join(p.name for p in sorted(log_dir.glob("*.png")))
    captions = " ".join(quote(c) for c in [entry["caption"][0], *EXAMPLES[cfg["demo"]][:2]])
    model = f"--model_path {quote(str(weights))} --phi {cfg['phi']}"
    return "\n".join([
        f"\nwritten: weights {weights} (and best_epoch_weights.pth, ep*.pth, full training states state_step*.pt)",
        f"         log folder {log_dir}/ ({plots}, history.jsonl, steps.jsonl, TensorBoard scalars)",
        "next:",
        f"  python predict.py {model} --image {quote(str(Path(cfg['datasets_path']) / entry['image']))} "
        f"--captions {captions}",
        f"  python eval.py {model} --datasets_path {quote(cfg['datasets_path'])} "
        f"--datasets_val_json_path {quote(cfg['datasets_val_json_path'])}",
        f"  tensorboard --logdir {quote(str(save_dir))}",
    ])
