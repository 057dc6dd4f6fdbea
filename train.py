"""Train or fine-tune CLIP on a JSON caption dataset (the original repo's format).

    python train.py --demo en                       # toy set, tiny model, CPU, a few minutes
    python train.py --model_path model_data/ViT-B-32-OpenAI.pth --datasets_path datasets/flickr8k/ ...
    torchrun --nproc_per_node 4 train.py --distributed true ...

Every variable below is also a --flag of the same name (booleans: true/false).
"""
from utils.config import config_block, parse_overrides
from utils.errors import run_main

# Cuda: use the GPU (None: when available). distributed: DDP under torchrun (nccl on GPUs, gloo on CPUs).
Cuda = None
distributed = False
# fp16: CUDA mixed precision, as in the original. precision overrides it: "fp32", "fp16" (CUDA AMP), "bf16".
fp16 = False
precision = ""
# Starting weights: any supported weight file or transformers folder; "" = random init (see README).
model_path = "model_data/ViT-B-32-OpenAI.pth"
phi = "openai/VIT-B-32"
# self-cn / cn-clip: a local transformers BERT folder for the text tower when model_path holds only a ViT.
bert_path = "model_data/bert-base-chinese"
bert_vocab_path = "model_data/bert-base-chinese-vocab.txt"
# batch_size is global: with N processes each takes batch_size / N, and the loss still spans all of it.
batch_size = 64
Init_Epoch = 0
Epoch = 100
# Learning rates before the original's batch-size scaling (batch_size / 64, clamped); scale_lr=False uses them as is.
Init_lr = 1e-4
Min_lr = Init_lr * 0.01
scale_lr = True
optimizer_type = "adamw"
momentum = 0.9
weight_decay = 1e-2
# "cos" or "step", per step, after a linear warmup over warmup_ratio of all steps.
lr_decay_type = "cos"
warmup_ratio = 0.05
grad_clip = 0.0
# Save weights every save_period epochs; full training states (for resume) every epoch, keeping keep_states.
save_period = 1
save_dir = "logs"
keep_states = 2
# resume: "" (fresh), a state file, or "auto" = the newest state in save_dir.
resume = ""
# Stop (resumably) after this many optimiser steps in this invocation; 0 = no limit.
stop_after_steps = 0
# Recall@K on the validation set every eval_period epochs.
eval_flag = True
eval_period = 5
num_workers = 4
datasets_path = "datasets/"
datasets_train_json_path = "datasets/en_train.json"
datasets_val_json_path = "datasets/en_val.json"
# Training augmentation (random resized crop, flip, AutoAugment); False: resize + centre crop (or letterbox).
datasets_random = True
letterbox_image = False
# Drop entries whose JSON or image is unusable (each is listed) instead of stopping before work starts.
skip_bad_samples = False
# Freeze a tower (LiT); trade compute for memory.
lock_image = False
lock_text = False
grad_checkpointing = False
seed = 11
# Stop after this many non-finite losses in a row (each is skipped).
max_bad_steps = 5
# "en" or "cn": the CPU demo on the generated toy set (its settings in utils/demo.py override the ones above).
demo = ""


def main(config: dict, explicit: dict) -> None:
    from utils.demo import run_demo
    from utils.training import run_training

    if config["demo"]:
        run_demo(config, explicit)
        return
    summary = run_training(config)
    if summary["interrupted"] > 0:
        raise SystemExit(128 + summary["interrupted"])


if __name__ == "__main__":
    defaults = config_block(globals())
    overrides = parse_overrides(defaults)
    run_main(main, overrides, {k: v for k, v in overrides.items() if v != defaults[k]})
