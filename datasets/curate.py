r"""Clean a caption file with a CLIP model: drop pairs whose image and caption disagree, near-duplicate images,
and list validation images that leak from the training set.

    python datasets/curate.py --model_path logs/demo_en/last_epoch_weights.pth --phi auto \
        --datasets_path datasets/toy/ --input datasets/toy/en_train.json --against datasets/toy/en_val.json \
        --output logs/curate/en_train_kept.json

(the demo's weights on the toy set, after python train.py --demo en; for your data, pretrained weights such as
--model_path openai --phi openai/VIT-B-32 and your caption files)

Writes the kept entries to `output` (kept.json) and, beside it, kept_scores.csv (every pair's score),
kept_scores.png (their histogram), kept_duplicates.json (near-duplicate groups) and, with `against`,
kept_leakage.csv (val images with a near-duplicate in the input).
Every variable below is also a --flag of the same name; --help lists them. README, "Curate a dataset".
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.config import run_script  # noqa: E402  (the repo root goes on the path first)

# The folder the input's image paths are relative to.
datasets_path = "datasets/"
# The caption file to curate: the original's JSON list, JSON Lines, or CSV/TSV (as train.py reads them).
input = "datasets/en_train.json"
# The kept entries, written as .json (the original's list), .jsonl, or .csv/.tsv (csv_*_column names); the
# reports are named after it.
output = "datasets/en_train_kept.json"
# Weights: any supported file or transformers folder (README, "Weights").
model_path = "model_data/ViT-B-32-OpenAI.pth"
# Architecture name from nets/configs.py, or "auto" to read it from the weights.
phi = "openai/VIT-B-32"
# Keep a caption when the cosine similarity of its image's and its own features is at least this (LAION-400M
# kept pairs at 0.28 with OpenAI's ViT-B/32; the scale differs between models, so read the histogram first);
# -1 keeps every caption. An image left with no caption is dropped.
min_clip_score = 0.28
# Two images whose features have a cosine similarity above this are near-duplicates (one group).
dup_threshold = 0.95
# "drop": keep only the first image (in file order) of each near-duplicate group; "list": list the groups but
# keep every image; "off": do not look for them (the search compares every pair of images).
duplicates = "drop"
# A second caption file (the validation set): its images with a near-duplicate (dup_threshold) among the
# input's are listed in <output>_leakage.csv. "" = no check.
against = ""
# The folder against's image paths are relative to; "" = datasets_path.
against_datasets_path = ""
# .csv / .tsv caption files (read and written): the image and caption columns (open_clip's names by default).
csv_image_column = "filepath"
csv_caption_column = "title"
# Images (or captions) encoded at a time.
batch_size = 64
# Threads that check the images, then decode them ahead of the model; None: one per core, at most 4.
num_workers = None
# Use the GPU; None: when one is available.
Cuda = None
# "fp32", "fp16" (CUDA) or "bf16"; None: fp16 on CUDA, fp32 on the CPU.
precision = None
# "torch", or "onnxruntime": on the CPU in fp32 the towers run in onnxruntime from an ONNX export made on first use
# and cached per weights (faster where onnxruntime's matmuls beat oneDNN's, as on AVX2 CPUs; --mode fps tells);
# "auto": onnxruntime on an AVX2 CPU without AVX-512 in fp32, else torch.
runtime = "torch"
# Fit the whole image on a grey canvas instead of cropping its centre.
letterbox_image = False
# Decode JPEGs only as large as the model's input needs (several times faster on photos); false decodes every
# image in full, for numbers reproduced bit for bit.
fast_decode = True
# Go on without entries whose record or image is unusable (each is listed) instead of stopping before work starts.
skip_bad_samples = False
# WordPiece vocabulary of the Chinese BERT text towers.
bert_vocab_path = "model_data/bert-base-chinese-vocab.txt"
# Replace output files that exist already (never done otherwise).
overwrite = False


def main(config: dict, explicit: dict) -> None:
    from utils.eval.curate import run_curate

    run_curate(config)


if __name__ == "__main__":
    run_script(globals(), main)
