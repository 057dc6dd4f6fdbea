r"""Image<->text retrieval recall@1/5/10 on a caption set (the original's metric and keys), or zero-shot
classification of an image-folder tree (eval_type zeroshot).

Examples after the demo and train.py --help's fine-tuning (<...>: your own folder):

    python eval.py --model_path logs/finetune_en/last_epoch_weights.pth --phi auto \
        --datasets_path datasets/toy/ --datasets_val_json_path datasets/toy/en_val.json
    python eval.py --eval_type zeroshot --model_path logs/demo_en/last_epoch_weights.pth --phi auto \
        --datasets_path <my_classes/>        # one subfolder of images per class
    python eval.py --eval_type wise_ft --phi auto --wise_ft_start_path logs/demo_en/last_epoch_weights.pth \
        --model_path logs/finetune_en/last_epoch_weights.pth --datasets_path datasets/toy/ \
        --datasets_val_json_path datasets/toy/en_val.json

Every variable below is also a --flag of the same name; --help lists them.
"""
from utils.config import run_script

# "retrieval" (image<->text recall@K, the original's), "zeroshot" (classification: README, "Zero-shot") or
# "wise_ft" (retrieval of blends of wise_ft_start_path and model_path: README, "WiSE-FT").
eval_type = "retrieval"
# Weights: a file or folder, or a name downloaded once: a pretrained tag of phi ("openai",
# "laion2b_s34b_b79k"), hf-hub:ORG/NAME or an http(s) URL (README, "Weights").
model_path = "openai"
# Architecture name from nets/configs.py, or "auto" to read it from the weights.
phi = "openai/VIT-B-32"
# The folder the JSON's image paths are relative to; zeroshot: the image-folder tree, one subfolder per class.
datasets_path = "datasets/"
# The captions to retrieve: a JSON list of {"image": ..., "caption": [...]}, JSON Lines, or CSV/TSV; zeroshot:
# when this file exists and its entries carry an integer "label" (names from classnames), it replaces the tree.
datasets_val_json_path = "datasets/en_val.json"
# .csv / .tsv caption files: the image and caption columns (open_clip's names by default).
csv_image_column = "filepath"
csv_caption_column = "title"
# zeroshot: a file with one class name per line, in sorted-folder (or label) order; "" = the folder names.
classnames = ""
# zeroshot: prompt templates with {c} for the class name: a JSON list file, one template, a language ("en":
# OpenAI's 80 ImageNet templates; "zh": Chinese-CLIP's 80, for Chinese class names through any tower), or "" =
# the tower's language (zh for the Chinese BERT towers, en for the others).
templates = ""
# Images (or captions) encoded at a time.
batch_size = 64
# Threads that check the images, then decode them ahead of the model; None: one per core, at most 4.
num_workers = None
# Decode JPEGs only as large as the model's input needs (several times faster on photos); false decodes every
# image in full, for numbers reproduced bit for bit.
fast_decode = True
# Use the GPU; None: when one is available.
Cuda = None
# "fp32", "fp16" (CUDA) or "bf16"; None: fp16 on CUDA, fp32 on the CPU.
precision = None
# "torch", or "onnxruntime": on the CPU in fp32 the towers run in onnxruntime from an ONNX export made on first use
# and cached per weights (faster where onnxruntime's matmuls beat oneDNN's, as on AVX2 CPUs; --mode fps tells);
# "auto": onnxruntime on an AVX2 CPU without AVX-512 in fp32, else torch.
runtime = "torch"
# NLLB-CLIP: the captions' FLORES-200 language code ("fra_Latn", "deu_Latn", "zho_Hans", ...), each caption's first
# token; "" = the tokenizer's default, eng_Latn. Other models take none.
text_language = ""
# Fit the whole image on a grey canvas instead of cropping its centre.
letterbox_image = False
# Drop entries whose JSON or image is unusable (each is listed) instead of stopping before work starts.
skip_bad_samples = False
# WordPiece vocabulary of the Chinese BERT text towers.
bert_vocab_path = "model_data/bert-base-chinese-vocab.txt"
# Results as JSON; "" = logs/eval_<run folder>_<weights>_<dataset>.json (zeroshot: logs/zeroshot_...json, and
# its confusion matrix as <output>_confusion.png beside it).
output = ""
# Replace result files that exist (output and its confusion plot; wise_ft: the sweep's three files); otherwise
# eval refuses before any work.
overwrite = False
# Reuse features encoded earlier with the same weights, phi, dataset and preprocessing...
feature_cache = True
# ...kept in this folder.
cache_dir = "logs/eval_cache"
# wise_ft: the weights before fine-tuning (model_path holds the fine-tuned ones); each alpha's blend
# (1 - alpha) * start + alpha * fine-tuned is scored on datasets_val_json_path.
wise_ft_start_path = ""
# wise_ft: the alphas to try, each from 0 (the start weights) to 1 (the fine-tuned weights).
wise_ft_alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
# wise_ft: a control set for what the start could do: "" (none), "retrieval" (r_mean on a caption set) or
# "zeroshot" (acc1 on a class tree); the chosen alpha has the best mean of both scores (no control: of r_mean).
control_type = ""
# wise_ft: the control set's folder (retrieval: the root of its images; zeroshot: one subfolder per class)...
control_datasets_path = ""
# ...and its caption file (retrieval), or a labelled JSON that replaces the tree (zeroshot; "" = the tree).
control_json_path = ""
# wise_ft: where wise_ft_weights.pth (the chosen alpha's weights), wise_ft_results.json and wise_ft.png go.
wise_ft_save_dir = "logs/wise_ft"

def main(config: dict, explicit: dict) -> None:
    from utils.eval.settings import check_settings

    check_settings(config)  # before torch is imported: a mistake is reported at once
    from utils.eval.run import run_eval

    run_eval(config)


if __name__ == "__main__":
    run_script(globals(), main)
