r"""Turn captions in any common layout into the original's JSON dataset (or WebDataset shards), checked.

Examples (<...>: your files); the last line it prints is the command to train on the result:

    python datasets/convert.py --source karpathy --input <dataset_flickr8k.json> --images <Flicker8k_Dataset/> \
        --output_dir datasets/flickr8k --name flickr8k
    python datasets/convert.py --source csv --input <captions.csv> --output_dir datasets/mine --name mine
    python datasets/convert.py --source folder --input <my_images/> --to wds --shard_size 1000

Every variable below is also a --flag of the same name; --help lists them. README, "Bring your own data".
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.config import run_script  # noqa: E402  (the repo root goes on the path first)

# The layout to read: karpathy, coco, flickr8k, csv, folder, jsonl, cn-clip or wds.
source = "karpathy"
# The annotation file, folder or shard pattern (shards/{00000..00009}.tar) to read.
input = "datasets/dataset_flickr8k.json"
# Where the images named in the input are; "" = the input's own folder.
images = ""
# Where <name>_train.json / _val.json / _test.json go; their image paths are relative to it, so it is the
# datasets_path to train with. Images embedded in the source (cn-clip, wds) are decoded to <output_dir>/<name>/.
output_dir = "datasets/"
# The first part of every output file name.
name = "mydata"
# For sources without splits: the share of images drawn at random for the val split (recall@K wants at least
# 100 val images; fewer are warned about)...
val_ratio = 0.05
# ...and for the test split...
test_ratio = 0.0
# ...drawn with this random seed (the same seed and input give the same splits).
seed = 0
# "json" (the original's format) or "wds" (tar shards <name>_<split>/00000.tar..., img2dataset's layout).
to = "json"
# Samples per shard with to="wds".
shard_size = 1000
# csv: the image and caption columns (open_clip's names by default)...
image_column = "filepath"
caption_column = "title"
# ...and the separator; "" = tab for .tsv, else sniffed from the header.
separator = ""
# The model whose text context the summary counts over-long captions against.
phi = "openai/VIT-B-32"
# WordPiece vocabulary, when phi has a BERT text tower.
bert_vocab_path = "model_data/bert-base-chinese-vocab.txt"
# Go on without malformed records (each is listed) instead of stopping.
skip_malformed = False
# Replace output files that exist already (never done otherwise).
overwrite = False
# Write every image once with its short side at this many pixels (never upscaled, EXIF orientation applied,
# aspect kept) to <output_dir>/<name>_<resize>px/, and point the output at those copies; 0 = the images as they
# are. A rerun keeps the copies already written, intact and made from the source as it is now with these
# settings (each copy records them), and remakes the others.
resize = 0
# JPEG quality of the resized copies (1 to 100).
jpeg_quality = 90
# Processes that resize; None: one per core.
num_workers = None


def main(config: dict, explicit: dict) -> None:
    from utils.data.sources.pipeline import convert

    convert(config)


if __name__ == "__main__":
    run_script(globals(), main)
