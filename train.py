r"""Train or fine-tune CLIP on a JSON caption dataset (the original repo's format).

    python train.py --demo en       # toy set, tiny model, CPU, a few minutes; then fine-tune its weights:
    python train.py --model_path logs/demo_en/last_epoch_weights.pth --phi tiny/VIT-T-8 --datasets_path datasets/toy/ \
        --datasets_train_json_path datasets/toy/en_train.json --datasets_val_json_path datasets/toy/en_val.json \
        --Epoch 1 --save_dir logs/finetune_en

Your own data: datasets/convert.py checks it and prints the command to train on it. Pretrained weights by name
(--model_path openai --phi openai/VIT-B-32 downloads them once): README, "Weights"; several GPUs (torchrun): README,
"Several GPUs or machines".
Every variable below is also a --flag of the same name; --help lists them.
"""
from utils.config import run_script

# Use the GPU; None: when one is available.
Cuda = None
# DDP under torchrun: one process per GPU (nccl), or CPU processes (gloo).
distributed = False
# CUDA mixed precision, as in the original; `precision` overrides it.
fp16 = False
# "fp32", "fp16" (CUDA AMP) or "bf16"; "" = fp16 when fp16=True, else fp32.
precision = ""
# Starting weights: a file or folder, or a name downloaded once: a pretrained tag of phi ("openai",
# "laion2b_s34b_b79k"), hf-hub:ORG/NAME or an http(s) URL; "" = random init (README, "Weights").
model_path = "openai"
# Architecture: a name from nets/configs.py (README, "Models").
phi = "openai/VIT-B-32"
# self-cn / cn-clip: a local transformers BERT folder for the text tower when model_path holds only a ViT.
bert_path = "model_data/bert-base-chinese"
# WordPiece vocabulary of the Chinese BERT text towers.
bert_vocab_path = "model_data/bert-base-chinese-vocab.txt"
# NLLB-CLIP: the captions' FLORES-200 language code ("fra_Latn", "deu_Latn", "zho_Hans", ...), each caption's first
# token; "" = the tokenizer's default, eng_Latn. Other models take none.
text_language = ""
# "softmax" (CLIP's contrastive loss) or "sigmoid" (SigLIP's: each image-caption pair scored on its own, with a
# learned logit_bias; a model without one gets scale 10 and bias -10 to start); "" = what the weights were trained
# with: sigmoid for a model with a logit_bias, else softmax (from scratch too).
loss = ""
# CoCa (phi coca_*): the loss is coca_contrastive_loss_weight x the contrastive loss above + coca_caption_loss_weight
# x the caption decoder's cross-entropy on each caption's next tokens (padding ignored); open_clip's defaults.
coca_caption_loss_weight = 2.0
coca_contrastive_loss_weight = 1.0
# Global batch: with N processes each takes batch_size / N, and the loss still spans all of it.
batch_size = 64
# First epoch to run (epochs before it count as done, for the schedule too).
Init_Epoch = 0
# Last epoch.
Epoch = 100
# Peak learning rate, before the original's batch-size scaling (see scale_lr).
Init_lr = 1e-4
# Final learning rate of the decay.
Min_lr = Init_lr * 0.01
# The original's rule: multiply both rates by batch_size / 64, then clamp Init_lr to [3e-5, 1e-4] (Adam/AdamW) or
# [5e-4, 5e-2] (SGD), and Min_lr to a hundredth of those; the run prints which bound acted.
scale_lr = True
# "adamw", "adam" or "sgd".
optimizer_type = "adamw"
# Adam's beta1, or SGD's momentum.
momentum = 0.9
# Decoupled weight decay (AdamW; L2 for Adam); never on gains, biases, embeddings or logit_scale.
weight_decay = 1e-2
# "cos" or "step" decay to Min_lr, per step, after the warmup.
lr_decay_type = "cos"
# Linear warmup over this share of all steps.
warmup_ratio = 0.05
# Clip the gradient norm to this; 0 = no clipping.
grad_clip = 0.0
# Save weights every save_period epochs (and the last epoch).
save_period = 1
# Where weights, training states and the log folder go.
save_dir = "logs"
# Full training states (for resume) are saved every epoch; keep this many.
keep_states = 2
# "" (fresh), a state file, or "auto" = the newest state in save_dir.
resume = ""
# Stop (resumably) after this many optimiser steps in this invocation; 0 = no limit.
stop_after_steps = 0
# Recall@K on the validation set during training...
eval_flag = True
# ...every eval_period epochs (and after the last).
eval_period = 5
# Data loading processes; None: as many as this machine's cores, at most 4.
num_workers = None
# The folder the JSON's image paths are relative to.
datasets_path = "datasets/"
# Training captions: a JSON list of {"image": "relative/path.jpg", "caption": ["...", ...]}, the same as JSON
# Lines (.jsonl), a CSV/TSV file with one image and caption per row (rows of one image merge), or WebDataset
# shards for data too big for a list: shards/{00000..00127}.tar, a .tar, or a .shards file listing them.
datasets_train_json_path = "datasets/en_train.json"
# Shards only: an epoch is what every process is sure to get from its share of shards; N > 0 caps it at N samples.
train_samples_per_epoch = 0
# Validation captions, in any of the caption-file formats.
datasets_val_json_path = "datasets/en_val.json"
# .csv / .tsv caption files: the image and caption columns (open_clip's names by default).
csv_image_column = "filepath"
csv_caption_column = "title"
# Training augmentation: "light" (random resized crop of 90-100% of the image), "none" (resize + centre crop,
# or letterbox) or "strong" (crop of 50-100%, flips that swap left/right in the caption, colour changes only
# for captions that name no colour). See README, "Augmentation".
augment = "light"
# The original's switch: False turns augmentation off (augment="none").
datasets_random = True
# Fit the whole image on a grey canvas instead of cropping its centre.
letterbox_image = False
# Decode JPEGs only as large as the model's input needs, with every random crop still at least the model's
# resolution (several times faster on photos); false decodes every image in full, for bit-for-bit reproduction.
fast_decode = True
# Drop entries whose JSON or image is unusable (each is listed) instead of stopping before work starts.
skip_bad_samples = False
# Freeze the image tower (LiT).
lock_image = False
# ...but keep its last N groups training (groups: embeddings, each block, the last block with ln_post, proj;
# a ResNet's: stem, its 4 stages, the attention pool; a timm tower's: its trunk's as timm groups them, then the head).
lock_image_unlocked_groups = 0
# Freeze the text tower.
lock_text = False
# ...but keep its last N groups training (embeddings, each block, the last block with the final norm, projection).
lock_text_unlocked_layers = 0
# Freeze the LayerNorms (a ResNet's BatchNorms) of the locked groups too; False lets their gains and biases train.
lock_layer_norm = True
# BatchNorm towers (ResNet, MobileCLIP's FastViT): keep the running statistics as loaded (small fine-tuning batches
# ruin them; gains and biases still train). False updates them; None (auto): frozen when model_path gives weights.
freeze_bn_stats = None
# LoRA rank (peft adapters on the unlocked towers; the base weights freeze); 0 = no LoRA. Saved weights are merged.
lora_r = 0
# LoRA scaling: the adapter's update is multiplied by lora_alpha / lora_r.
lora_alpha = 16
# Dropout on the adapters' input.
lora_dropout = 0.0
# Layers that get adapters: "attn" (q, k, v and output projections), "mlp", or Linear layer names (e.g. c_fc).
lora_targets = ["attn", "mlp"]
# Recompute activations in the backward pass: less memory, more compute.
grad_checkpointing = False
# Split each process's batch into this many micro-batches (less memory), keeping every negative of the
# whole batch: the gradients equal one batch of batch_size. Must divide batch_size / processes.
accum_freq = 1
# WiSE-FT: after the last epoch also save (1 - a) * starting weights + a * fine-tuned weights, a in [0, 1];
# None = no blend. eval.py --eval_type wise_ft sweeps a on two weight files.
wise_ft_alpha = None
# Seed of the initialisation, shuffle order, caption choice and augmentation.
seed = 11
# Stop after this many non-finite losses in a row (each is skipped).
max_bad_steps = 5
# Resume even when an explicit --phi contradicts the state's architecture (the state's is kept).
resume_force = False
# "en" or "cn": the CPU demo on the generated toy set (its settings in utils/train/demo.py replace the defaults
# above; flags given on the command line still win).
demo = ""

def main(config: dict, explicit: dict) -> None:
    from utils.train.settings import check_settings

    check_settings(config)  # before torch is imported: a mistake is reported at once
    from utils.train.demo import run_demo
    from utils.train.run import run_training

    if config["demo"]:
        run_demo(config, explicit)
        return
    summary = run_training(config, explicit)
    if summary["interrupted"] > 0:
        raise SystemExit(128 + summary["interrupted"])


if __name__ == "__main__":
    run_script(globals(), main)
