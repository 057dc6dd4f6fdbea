"""End-to-end retrieval eval as a user runs it: `eval.py` vs a competent open_clip loop, fresh processes.

    python benchmarks/bench_eval.py [--images 200] [--phi openai/VIT-B-32] [--precision fp32 bf16]

Both sides get the same random weights and the same 200 Flickr-sized JPEGs with 5 captions each, and are
timed from process start to printed recall (imports, model load, decoding, encoding, scoring). The open_clip
side is what a competent user writes: images and captions in batches of 64 under `torch.inference_mode()`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = dict(who=["a man", "a woman", "two children", "a little girl", "a brown dog", "a black dog", "a group of people",
                  "a boy in a red shirt", "an old man", "a surfer", "a cyclist", "two dogs"],
             does=["is running", "is jumping", "is sitting", "is playing", "is standing", "walks", "rides a bike",
                   "climbs a rock", "swims", "is looking at the camera"],
             where=["on the beach", "in the snow", "through the grass", "on a busy street", "in a park",
                    "near the water", "in front of a building", "on a wooden bench", "at the top of a hill", ""])

PEER = r'''
import sys, time, json
start = time.time()
import numpy as np, torch, open_clip
from PIL import Image
sys.path.insert(0, {root!r})
from utils.metrics import itm_eval
entries = json.load(open({json_path!r}))
model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained=None)
model.load_state_dict(torch.load({weights!r}, weights_only=True), strict=False)
model.eval()
tokenizer = open_clip.get_tokenizer("ViT-B-32-quickgelu")
texts, txt2img, img2txt = [], [], []
for i, e in enumerate(entries):
    img2txt.append(list(range(len(texts), len(texts) + len(e["caption"]))))
    for c in e["caption"]:
        texts.append(c); txt2img.append(i)
# The loop a competent user writes: batches of 64 under inference_mode, for images and captions alike.
paths = [{root_dir!r} + "/" + e["image"] for e in entries]
with torch.inference_mode():
    image_features = torch.cat([model.encode_image(torch.stack([preprocess(Image.open(p).convert("RGB"))
                                                                for p in paths[i:i + 64]]))
                                for i in range(0, len(paths), 64)])
    text_features = torch.cat([model.encode_text(tokenizer(texts[i:i + 64])) for i in range(0, len(texts), 64)])
image_features = image_features / image_features.norm(dim=-1, keepdim=True)
text_features = text_features / text_features.norm(dim=-1, keepdim=True)
scores = (image_features @ text_features.t()).numpy()
print(json.dumps(itm_eval(scores, scores.T, txt2img, img2txt)))
'''


def make_data(folder: Path, n: int) -> Path:
    from PIL import Image

    json_path = folder / "captions.json"
    if json_path.exists() and len(json.loads(json_path.read_text())) == n:
        return json_path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        # Smooth random colour fields compress like photos, unlike white noise.
        small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(folder / f"{i:04d}.jpg", quality=90)
        captions = [" ".join(filter(None, [rng.choice(WORDS["who"]), rng.choice(WORDS["does"]), rng.choice(WORDS["where"])]))
                    + " ." for _ in range(5)]
        entries.append({"image": f"{i:04d}.jpg", "caption": captions})
    json_path.write_text(json.dumps(entries))
    return json_path


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str]) -> tuple[float, str, float]:
    """(wall seconds, stdout, CPU seconds of the process and its children): on a loaded machine the CPU time
    is the steadier measure."""
    start, cpu = time.perf_counter(), children_cpu()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return time.perf_counter() - start, out.stdout, children_cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--phi", default="openai/VIT-B-32")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--workdir", default="/tmp/clip_bench_eval")
    args = parser.parse_args()
    import torch

    from nets import build_model, get_config

    work = Path(args.workdir)
    json_path = make_data(work / "data", args.images)
    weights = work / "weights.pth"
    if not weights.exists():
        torch.manual_seed(0)
        torch.save(build_model(get_config(args.phi)).state_dict(), weights)
    peer_script = work / "peer_eval.py"
    peer_script.write_text(PEER.format(root=str(ROOT), json_path=str(json_path), weights=str(weights),
                                       root_dir=str(json_path.parent)))
    print(f"{args.images} images; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    peer_time, peer_out, peer_cpu = timed([sys.executable, str(peer_script)])
    peer_metrics = json.loads(peer_out.strip().splitlines()[-1])
    print(f"open_clip loop: {peer_time:.1f} s ({peer_cpu:.1f} CPU s)  r_mean {peer_metrics['r_mean']:.3f}")
    for precision in args.precision:
        output = work / f"ours_{precision}.json"
        output.unlink(missing_ok=True)  # eval.py refuses to replace an earlier run's results
        ours_time, _, ours_cpu = timed([sys.executable, str(ROOT / "eval.py"), "--model_path", str(weights), "--phi", args.phi,
                              "--datasets_path", str(json_path.parent), "--datasets_val_json_path", str(json_path),
                              "--precision", precision, "--feature_cache", "false", "--output", str(output),
                              "--num_workers", "2", "--batch_size", "64"])
        metrics = json.loads(output.read_text())["metrics"]
        print(f"eval.py {precision}: {ours_time:.1f} s ({ours_cpu:.1f} CPU s)  r_mean {metrics['r_mean']:.3f}  "
              f"speed-up {peer_time / ours_time:.2f}x ({peer_cpu / ours_cpu:.2f}x in CPU time) vs open_clip fp32")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
