"""Image<->text retrieval recall@1/5/10 on a JSON caption set (the original's metric and keys).

    python eval.py --model_path logs/demo_en/last_epoch_weights.pth --phi auto \
        --datasets_path datasets/toy/ --datasets_val_json_path datasets/toy/en_val.json

Every variable below is also a --flag of the same name (booleans: true/false).
"""
from utils.config import config_block, parse_overrides
from utils.errors import run_main

model_path = "model_data/ViT-B-32-OpenAI.pth"
# Architecture name from nets/configs.py, or "auto" to read it from the weights.
phi = "openai/VIT-B-32"
datasets_path = "datasets/"
datasets_val_json_path = "datasets/en_val.json"
batch_size = 64
num_workers = 4
# None: use CUDA when available.
Cuda = None
# "fp32", "fp16" (CUDA) or "bf16"; None: fp16 on CUDA, fp32 on the CPU.
precision = None
letterbox_image = False
# Drop entries whose JSON or image is unusable (each is listed) instead of stopping before work starts.
skip_bad_samples = False
bert_vocab_path = "model_data/bert-base-chinese-vocab.txt"
# Results as JSON; "" = logs/eval_<weights>_<dataset>.json.
output = ""
# Reuse features encoded earlier with the same weights, phi, dataset and preprocessing.
feature_cache = True
cache_dir = "logs/eval_cache"


def main(config: dict) -> None:
    from utils.eval_run import run_eval

    run_eval(config)


if __name__ == "__main__":
    run_main(main, parse_overrides(config_block(globals())))
