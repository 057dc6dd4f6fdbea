r"""Zero-shot prediction: type an image path, get one probability per caption (or label).

Examples with the demo's weights (python train.py --demo en writes them); for yours, change --model_path and --phi:

    python predict.py --model_path logs/demo_en/last_epoch_weights.pth --phi auto   # the loop: "Input image path: "
    python predict.py --model_path logs/demo_en/last_epoch_weights.pth --phi auto --image img/example.jpg  # once
    python predict.py --model_path logs/demo_en/last_epoch_weights.pth --phi auto --image img/example.jpg \
        --captions "a red circle" "a blue square"    # any config variable below is a --flag
    python predict.py --model_path logs/demo_en/last_epoch_weights.pth --phi auto --image img/example.jpg \
        --labels circle square star                   # zero-shot classes through prompt templates
    python predict.py --mode dir_predict --model_path logs/demo_en/last_epoch_weights.pth --phi auto \
        --dir_origin_path img/ --labels circle square  # a folder's images into a CSV in img_out/
    python predict.py --mode search --model_path logs/demo_en/last_epoch_weights.pth --phi auto \
        --dir_origin_path img/ --query "a red circle"  # text or an image path -> the best matches
    python predict.py --mode web --model_path logs/demo_en/last_epoch_weights.pth --phi auto \
        --dir_origin_path img/                        # a page on http://127.0.0.1:7860/
    python predict.py --mode embed --model_path logs/demo_en/last_epoch_weights.pth --phi auto \
        --dir_origin_path img/ --embeddings_dir logs/emb  # features in clip-retrieval's layout, in parts
    torchrun --nproc_per_node 2 predict.py --mode embed --distributed true --caption_file train.json ...
    python predict.py --mode index --embeddings_dir logs/emb --index_dir logs/idx  # FAISS, sized to index_memory
    python predict.py --mode search --model_path logs/demo_en/last_epoch_weights.pth --phi auto \
        --index_dir logs/idx --query "a red circle" --top_k 5   # answered from that index
    python predict.py --mode fps --model_path logs/demo_en/last_epoch_weights.pth --phi auto  # images/s here
    python predict.py --mode export_onnx --model_path logs/demo_en/last_epoch_weights.pth --phi auto \
        --export_dir model_data/onnx                  # image.onnx + text.onnx for deployment
    python predict.py --mode predict_onnx --export_dir model_data/onnx --image img/example.jpg  # by onnxruntime
    python predict.py --mode export_hf --model_path logs/demo_en/last_epoch_weights.pth --phi auto \
        --export_dir model_data/hf                    # a transformers CLIPModel folder
"""
from __future__ import annotations

from utils.config import run_script

# "predict" (ask for image paths in a loop), "dir_predict" (every image of a folder into a CSV), "search" (find
# images of dir_origin_path, or of an index built by "index", by text or by example), "web" (a local page for both),
# "embed" (features of a folder, caption file or shards into embeddings_dir), "index" (a FAISS index of
# embeddings_dir in index_dir), "fps" (speed), "export_onnx" (write the model as ONNX to export_dir),
# "predict_onnx" (the "predict" loop on export_dir with onnxruntime) or "export_hf" (write the model to export_dir
# as a transformers CLIPModel / ChineseCLIPModel folder) or "caption" (a CoCa writes a caption for every image of
# dir_origin_path into a caption file train.py reads).
mode = "predict"
# Weights: a file or folder, or a name downloaded once: a pretrained tag of phi ("openai",
# "laion2b_s34b_b79k"), hf-hub:ORG/NAME or an http(s) URL (README, "Weights"); "" = random weights.
model_path = "openai"
# Architecture name from nets/configs.py, or "auto" to read it from the weights.
phi = "openai/VIT-B-32"
# Captions to score; edit here or pass --captions "..." "...".
captions = ["a photo of a dog", "a photo of a cat", "a red circle and a blue square", "a green triangle"]
# Zero-shot classes: when given, each label is scored through the prompt templates (ensembled) instead of captions.
labels = []
# Prompt templates with {c} for the label: a JSON list file, one template, a language ("en", "zh": Chinese-CLIP's
# 80), or "" = OpenAI's 80 ImageNet templates (Chinese-CLIP's for Chinese text towers).
templates = ""
# Answer for this image once instead of asking in a loop.
image = ""
# dir_predict: the folder whose images (searched recursively) are scored...
dir_origin_path = "img/"
# ...and the folder of its CSV, predictions_<run folder>_<weights>_<folder>.csv (path, then the top_k labels or
# captions with their probabilities).
dir_save_path = "img_out/"
# dir_predict: replace that CSV when it exists; otherwise dir_predict refuses before loading the model.
overwrite = False
# dir_predict: how many of the best labels (or captions) each row lists.
top_k = 5
# search and web: where the index of dir_origin_path's image features is kept (updated incrementally on each
# run); "" = logs/search_index/<folder>_<hash of its full path>, one per indexed folder; or an index built by
# mode "index" (then answered from as it is). Given without dir_origin_path it must hold an index (a folder
# search answers for its own folder). index: where that index is written...
index_dir = ""
# ...re-encoded from scratch when true (needed after changing weights or phi)...
rebuild_index = False
# ...and answered once for this query (a text, or an image path) instead of asking in a loop.
query = ""
# embed: a caption file train.py reads (JSON list, JSON Lines, CSV, TSV) or WebDataset shards (a brace pattern,
# a .tar, a folder of .tar files); "" embeds the images of dir_origin_path.
caption_file = ""
# embed: the folder the caption file's image paths are relative to; "" = the caption file's folder.
datasets_path = ""
# embed writes (and index reads) here: img_emb/, text_emb/, metadata/ in clip-retrieval's layout.
embeddings_dir = "logs/embeddings"
# embed: images per part file; a rerun after a crash redoes only unfinished parts (shards: one part per shard).
part_size = 10000
# embed: "float16" (clip-retrieval's default, half the disk) or "float32".
embed_dtype = "float16"
# embed and caption: threads that decode the next batch of images while the model encodes this one.
num_workers = 2
# embed: one process per GPU (or gloo processes on CPUs) under torchrun, each taking its share of the parts.
distributed = False
# index: "auto" (exact Flat while it fits comfortably, else IVF / IVF-PQ chosen from the vector count and
# index_memory), "flat", "ivf", "hnsw", "pq" (sized by the same rule), or any faiss index_factory string such as
# "IVF4096,PQ64". Tuned for image and text queries; embeddings without captions are tuned on prompts encoded by
# the weights embed.json names (else model_path / phi, which must be those weights).
index_type = "auto"
# index: the memory the index may take, e.g. "4G", "500M".
index_memory = "4G"
# web: the port of the page, served on 127.0.0.1 only.
port = 7860
# dir_predict, caption and fps: images per batch (fps also measures batch 1).
batch_size = 32
# Fit the whole image on a grey canvas instead of cropping its centre.
letterbox_image = False
# export_onnx writes image.onnx, text.onnx, config.json and the tokenizer vocabulary here; predict_onnx reads them.
# export_hf writes a transformers folder here (a new or empty folder, or an earlier export_hf, which it replaces).
export_dir = "model_data/onnx"
# export_onnx: fp16 weights, inputs and outputs, for GPU deployment (false: fp32).
export_fp16 = False
# Decode JPEGs only as large as the model's input needs (several times faster on photos); false decodes every
# image in full, for numbers reproduced bit for bit.
fast_decode = True
# caption: the caption file (the original's JSON list, image paths relative to dir_origin_path); "" =
# dir_save_path/captions_<run folder>_<weights>_<folder>.json. A rerun keeps its entries and adds the images it lacks.
output = ""
# caption: "beam_search" (open_clip's default), "greedy", "top_k" or "top_p" (sampling), with open_clip's settings:
generation = "beam_search"
# beams (searched in num_beam_groups groups, as open_clip's)...
num_beams = 6
num_beam_groups = 3
# ...top_p's kept probability mass (top_k: the top_k setting above, open_clip's 1 unless given)...
top_p = 0.1
# ...the longest caption in tokens with its start and end (at most the text tower's 76), the shortest before its
# end token may come, and the window of last tokens the decoder reads...
seq_len = 30
min_seq_len = 5
max_seq_len = 77
# ...the sampling temperature, and the repetition penalty (1.0: none).
temperature = 1.0
repetition_penalty = 1.0
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

def main(config: dict, explicit: dict) -> None:
    from utils.predict.settings import check_settings

    check_settings(config)  # before torch is imported: a mistake is reported at once
    from utils.predict.inputs import check_inputs, search_inputs
    from utils.predict.modes import MODES

    if config["mode"] in ("search", "web"):  # an index_dir is used only as given; mode index builds where told
        config = search_inputs(config, explicit)
    if config["mode"] == "caption" and "top_k" not in explicit:  # dir_predict's 5 is not open_clip's sampling 1
        config = {**config, "top_k": 1}
    check_inputs(config)
    MODES[config["mode"]](config)


if __name__ == "__main__":
    run_script(globals(), main)
