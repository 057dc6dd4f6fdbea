"""mode="export_hf": the model as a transformers CLIPModel (ChineseCLIPModel for Chinese-CLIP, SiglipModel for
SigLIP and SigLIP 2, MetaClip2Model for MetaCLIP 2 "worldwide", AltCLIPModel for AltCLIP) folder.

The folder is what `from_pretrained` reads: config.json, model.safetensors, the tokenizer's files and the image
processor's config. It is written in a hidden temporary folder beside export_dir, loaded back with transformers
and compared with this model there, and only then renamed into place, so a failed export leaves nothing behind
and an earlier export stays as it was.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from PIL import Image

from utils.data.preprocess import Preprocess
from utils.errors import UserError
from utils.files import new_file_mode, write_error
from utils.tokenizer import EOT_TOKEN, NUM_MERGES, SOT_TOKEN, XLM_SENTENCEPIECE, BPETokenizer
from utils.weights.layouts import (is_metaclip2, open_clip_to_siglip, openai_to_transformers, siglip_head,
                                   siglip_transformers_config, transformers_config)

# Every name an export writes: a folder holding only these is an earlier export, which may be replaced.
EXPORT_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt", "vocab.txt", "tokenizer_config.json",
                "special_tokens_map.json", "preprocessor_config.json", "tokenizer.json", "spiece.model",
                "tokenizer.model", XLM_SENTENCEPIECE)
# Largest |transformers - this model| the check after writing accepts (features and probabilities).
TOLERANCE = 1e-3
# 256 bytes, each also as a word end, the merges, SOT and EOT: utils.tokenizer.BPETokenizer's vocabulary.
BPE_VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2
_CHECK_CAPTIONS = {"openai": ["a dog", "a photo of a red car parked next to a tall building on a rainy day", "it's"],
                   "bert": ["一只狗", "一张照片：雨天停在高楼旁边的一辆红色汽车", "a cat"],
                   # Already canonical (lower case, no punctuation): transformers' fast tokenizer does not clean
                   # captions as SigLIP's training did, so its users pass them cleaned, as these are.
                   "siglip": ["a dog", "a photo of a red car parked next to a tall building on a rainy day", ""],
                   "multilingual": ["a dog", "一张照片：雨天停在高楼旁边的一辆红色汽车", "a photo of a red car"]}
# transformers' model class of each family export_hf writes: (its processor, the check's captions).
CLASSES = {"CLIPModel": ("CLIPProcessor", "openai"), "ChineseCLIPModel": ("ChineseCLIPProcessor", "bert"),
           "SiglipModel": ("SiglipProcessor", "siglip"), "MetaClip2Model": ("CLIPProcessor", "multilingual"),
           "AltCLIPModel": ("AltCLIPProcessor", "multilingual")}


def is_siglip(config) -> bool:
    """SigLIP's towers (timm's attention-pool trunk, the bidirectional text tower): transformers' SiglipModel."""
    return config.vision.kind == "timm" and config.text.kind == "siglip"


def transformers_class(config) -> str:
    """The name of the transformers class in CLASSES that holds the towers of `config` (one with no `refusal`)."""
    if is_siglip(config):
        return "SiglipModel"
    if config.text.is_bert:
        return "ChineseCLIPModel"
    if config.text.kind == "altclip":
        return "AltCLIPModel"
    return "MetaClip2Model" if is_metaclip2(config.text) else "CLIPModel"


def refusal(config) -> str | None:
    """Why no transformers class computes this architecture exactly, or None when one does."""
    if is_siglip(config):
        return None
    if config.decoder is not None:
        return ("transformers has no CoCa class (an attentional pooler and a caption decoder over OpenAI's towers); use "
                "export_onnx for its contrastive towers, or this project's weight file, which open_clip reads as it is")
    if config.text.kind == "hf":
        return (f"transformers has no CLIP class with open_clip's {config.text.tokenizer} text tower "
                f"({config.text.hf_pooler}, {config.text.hf_proj or 'no'} projection); use this project's weight file, "
                "which open_clip reads (README, 'Export to transformers and open_clip')")
    if getattr(config.vision, "kind", "vit") == "resnet":
        return ("transformers has no CLIP class with OpenAI's ResNet image tower (ModifiedResNet with attention "
                "pooling); export_hf takes ViT models only. Use export_onnx, or this project's weight file with "
                "open_clip (README, 'Export to transformers and open_clip')")
    if getattr(config.vision, "kind", "vit") == "timm" and "siglip" not in config.vision.timm_model_name:
        return (f"transformers has no CLIP class with timm's {config.vision.timm_model_name} image tower (open_clip's "
                "TimmModel); export_hf takes OpenAI's ViT and SigLIP. Use export_onnx, or this project's weight file, "
                "which open_clip reads as it is")
    # AltCLIP's XLM-R tower and MetaCLIP 2's (the first </s> of XLM-V's ids) have classes of their own.
    own_text = config.text.kind == "altclip" or is_metaclip2(config.text)
    if not config.vision.ln_pre or config.vision.pool != "token" or not own_text and (
            not config.text.causal or config.text.pool != "argmax" or config.text.tokenizer):
        return ("transformers' CLIPModel pools the class token after ln_pre and the causal text tower's EOT through "
                "OpenAI's BPE (MetaClip2Model the first </s> of XLM-V's ids); this model (CLIPA's variant: patch mean "
                "without ln_pre, a text tower without the causal mask pooled at its last position; or another "
                "pooling or tokenizer) is not computed by them. Use export_onnx or this project's weight file")
    if getattr(config.vision, "kind", "vit") != "vit" or config.text.kind == "siglip":
        return ("transformers' SiglipModel has SigLIP's image and text towers together; this model pairs one of them "
                "with another kind of tower. Use export_onnx or this project's weight file")
    if config.init_logit_bias is not None:
        return ("the model has a logit_bias (trained with the sigmoid loss), which transformers' CLIPModel has no "
                "place for; use export_onnx or this project's weight file")
    if config.text.kind == "bert-pooler":
        return ("transformers has no CLIP class with self-cn's text head (BERT pooler -> ln_final -> projection); "
                "export_hf takes the OpenAI text tower and Chinese-CLIP's [CLS] head (cn-clip). Use export_onnx")
    if config.text.kind == "openai" and not config.text.tokenizer and config.text.vocab_size != BPE_VOCAB_SIZE:
        return (f"the text tower has {config.text.vocab_size} token ids but the BPE tokenizer written with the "
                f"export has {BPE_VOCAB_SIZE}; export_hf needs OpenAI's vocabulary")
    return None


def _json(data: dict) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _bpe_files(context_length: int) -> dict[str, bytes]:
    """vocab.json and merges.txt of OpenAI's BPE, in the layout of openai/clip-vit-base-patch32 on the hub."""
    tokenizer = BPETokenizer()
    merges = [" ".join(pair) for pair in sorted(tokenizer.merge_ranks, key=tokenizer.merge_ranks.get)]
    # The pad token is EOT, as on the hub: "!" (id 0, this project's padding) would become a special token
    # and split "!!" apart. The tower stops reading at the first EOT, so what pads after it changes nothing.
    special = {"bos_token": SOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN, "pad_token": EOT_TOKEN}
    return {
        "vocab.json": json.dumps(tokenizer.encoder, ensure_ascii=False).encode("utf-8"),
        "merges.txt": ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"),
        "tokenizer_config.json": _json({"tokenizer_class": "CLIPTokenizer", "processor_class": "CLIPProcessor",
                                        "model_max_length": context_length, "do_lower_case": True,
                                        "errors": "replace", "add_prefix_space": False, **special}),
        "special_tokens_map.json": _json(special),
    }


def _bert_files(vocab_path: Path, context_length: int) -> dict[str, bytes]:
    """vocab.txt and the BertTokenizer settings of utils.tokenizer.BertTokenizer (lower case, CJK split)."""
    special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
               "mask_token": "[MASK]"}
    return {
        "vocab.txt": vocab_path.read_bytes(),
        "tokenizer_config.json": _json({"tokenizer_class": "BertTokenizer", "processor_class": "ChineseCLIPProcessor",
                                        "model_max_length": context_length, "do_lower_case": True,
                                        "tokenize_chinese_chars": True, "strip_accents": None, **special}),
        "special_tokens_map.json": _json(special),
    }


def _image_processor(config, preprocess: Preprocess) -> dict:
    """The weights' eval transform (utils.data.images.eval_transform of their record) as the image processor's
    settings, which Preprocess.from_transformers reads back."""
    return {
        "image_processor_type": "ChineseCLIPImageProcessor" if config.text.is_bert else "CLIPImageProcessor",
        "processor_class": CLASSES[transformers_class(config)][0],
        **preprocess.to_transformers(config.vision.image_size),
    }


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    # The q, k, v chunks of a fused projection are views of one storage, which safetensors refuses to save;
    # copying only those keeps the export from holding a second copy of the whole model.
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if whole else tensor.clone()


def _tokenizer_files(tokenizer, context_length: int, processor_class: str, **settings) -> dict[str, bytes]:
    """The files transformers' `save_pretrained` writes for the tokenizer read beside the weights (SigLIP's, XLM-V's,
    XLM-R's), its maximum length the text tower's context, so that the processor cuts captions where it does."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.tokenizer.save_pretrained(folder)
        files = {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
    unknown = sorted(set(files) - set(EXPORT_FILES))
    if unknown:
        raise UserError(f"the tokenizer writes {', '.join(unknown)}, which export_hf does not know; please report this")
    saved = json.loads(files["tokenizer_config.json"])
    for how_it_was_read in ("is_local", "local_files_only"):  # this machine's loading, not the tokenizer's
        saved.pop(how_it_was_read, None)
    files["tokenizer_config.json"] = _json({**saved, **settings, "model_max_length": context_length,
                                            "processor_class": processor_class})
    return files


def _siglip_files(model) -> dict[str, bytes | dict[str, torch.Tensor]]:
    """SiglipModel's folder: its config, the weights under its names, SiglipImageProcessor's settings of the
    weights' preprocessing, and the tokenizer's files."""
    net, config, preprocess = model.net, model.net.config, model.transform.preprocess
    if preprocess.resize_mode != "squash":
        raise UserError(f"transformers' SiglipImageProcessor only resizes to the square (the weights say resize_mode "
                        f"{preprocess.resize_mode!r}); use export_onnx, which keeps this model's resize")
    tokenizer = model.tokenizer
    hf_config = siglip_transformers_config(config, tokenizer.pad_token_id, tokenizer.tokenizer.eos_token_id)
    hf_config.architectures = ["SiglipModel"]
    state = siglip_head({k: v.detach().float().cpu() for k, v in net.state_dict().items()}, config)
    weights = {k: _own_storage(v.contiguous()) for k, v in open_clip_to_siglip(state).items()}
    processor = {"image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor",
                 **preprocess.to_transformers(config.vision.image_size)}
    for crop in ("do_center_crop", "crop_size"):
        processor.pop(crop, None)
    return {"config.json": hf_config.to_json_string().encode("utf-8"), "model.safetensors": weights,
            "preprocessor_config.json": _json(processor),
            # No attention mask, as the hub's SiglipTokenizer gives none: SigLIP's tower attends to the padding it
            # was trained with, and SiglipModel would mask it out where the processor returned one.
            **_tokenizer_files(tokenizer, config.text.context_length, "SiglipProcessor",
                               model_input_names=["input_ids"])}


def export_files(model) -> dict[str, bytes | dict[str, torch.Tensor]]:
    """{file name: contents} of the transformers folder of `model` (a clip.CLIP whose architecture has no
    `refusal`): bytes, or for model.safetensors the fp32 tensors under transformers' names."""
    net = model.net
    config = net.config
    preprocess = model.transform.preprocess
    if is_siglip(config):
        return _siglip_files(model)
    if preprocess.resize_mode == "longest":
        raise UserError("transformers' CLIPImageProcessor cannot letterbox (resize_mode 'longest'); export with "
                        "letterbox_image=False, or use export_onnx, which keeps the letterbox")
    kind = transformers_class(config)
    ids = {}
    if kind == "MetaClip2Model":
        ids = dict(bos_token_id=model.tokenizer.tokenizer.bos_token_id, pad_token_id=model.tokenizer.pad_token_id)
    hf_config = transformers_config(config, **ids)
    hf_config.architectures = [kind]
    hf_config.logit_scale_init_value = net.logit_scale.item()  # the config says what the weights hold
    # Each tower's own config is what CLIPVisionModelWithProjection and the like read on their own.
    hf_config.vision_config.projection_dim = config.embed_dim
    if kind == "CLIPModel":
        hf_config.text_config.projection_dim = config.embed_dim
        hf_config.text_config.pad_token_id = hf_config.text_config.eos_token_id  # as tokenizer_config.json says
    weights = {k: _own_storage(v.detach().float().cpu().contiguous())
               for k, v in openai_to_transformers(net.state_dict()).items()}
    files = {"config.json": hf_config.to_json_string().encode("utf-8"), "model.safetensors": weights,
             "preprocessor_config.json": _json(_image_processor(config, preprocess))}
    if config.text.is_bert:
        files.update(_bert_files(Path(model.bert_vocab_path), config.text.context_length))
    elif config.text.tokenizer:  # XLM-V's or XLM-R's, read beside the weights
        files.update(_tokenizer_files(model.tokenizer, config.text.context_length, CLASSES[kind][0]))
    else:
        files.update(_bpe_files(config.text.context_length))
    return files


def check_image() -> Image.Image:
    """A seeded noise picture, not square, so the check goes through the resize and the crop."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (150, 200, 3), dtype=torch.uint8, generator=g)
    return Image.fromarray(pixels.numpy())


def compare(folder: Path, model, log=print) -> float:
    """Largest |transformers - `model`| over the probabilities (CLIPProcessor + CLIPModel against
    `CLIP.detect_image`) and the text and image features of a check image and captions; `log` gets the line."""
    import transformers

    kind = transformers_class(model.net.config)
    siglip = kind == "SiglipModel"
    processor_name, caption_set = CLASSES[kind]
    model_class, processor_class = getattr(transformers, kind), getattr(transformers, processor_name)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar would read as the export's own
    try:
        hf = model_class.from_pretrained(folder).eval()
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    processor = processor_class.from_pretrained(folder, backend="pil")
    image, captions = check_image(), _CHECK_CAPTIONS[caption_set]
    # SigLIP's captions are padded to the full context, as it was trained (its tower attends to the padding).
    padding = dict(padding="max_length", max_length=model.tokenizer.context_length, truncation=True) if siglip \
        else dict(padding=True)
    inputs = processor(text=captions, images=image, return_tensors="pt", **padding)
    with torch.no_grad():
        out = hf(**inputs)
    ours_image, ours_text = model.detect_image_for_eval([image], captions)
    # SigLIP's are independent sigmoids, CLIP's a softmax over the captions: detect_image says which.
    probabilities = out.logits_per_image.sigmoid() if siglip else out.logits_per_image.softmax(-1)
    differences = {
        "probabilities": (probabilities - torch.from_numpy(model.detect_image(image, captions))),
        "image features": out.image_embeds - torch.nn.functional.normalize(ours_image.float().cpu(), dim=-1),
        "text features": out.text_embeds - torch.nn.functional.normalize(ours_text.float().cpu(), dim=-1),
    }
    worst = {name: diff.abs().max().item() for name, diff in differences.items()}
    log("transformers vs this model (max |difference|, features L2-normalised): "
        + ", ".join(f"{name} {value:.2e}" for name, value in worst.items()))
    return max(worst.values())


def _earlier_export(folder: Path) -> bool:
    """True for a folder holding nothing but the files of an earlier export_hf (replacing it loses nothing)."""
    names = {p.name for p in folder.iterdir()}
    return "config.json" in names and names <= set(EXPORT_FILES)


def check_target(folder: Path) -> None:
    """Refuse, before any work, an export_dir that is a file or holds anything but an earlier export."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"export_dir {folder} is a file; choose a folder (new, empty, or an earlier export_hf export)")
    if folder.is_dir() and any(folder.iterdir()) and not _earlier_export(folder):
        raise UserError(f"export_dir {folder} is not empty and is not an earlier export_hf export; choose a new or "
                        "empty folder (an earlier export there would be replaced)")
    # Nothing is created yet (a refused model must leave no trace): the nearest folder that exists must let the
    # export make its parents and the temporary folder.
    existing = next(p for p in (folder.absolute().parent, *folder.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"export_dir {folder} cannot be created: {existing} is not a writable folder; choose another "
                        "export_dir")


def write_folder(folder: Path, files: dict[str, bytes | dict[str, torch.Tensor]], check=None) -> None:
    """`files` as `folder` (a dict of tensors as safetensors), all or nothing: written and synced into a hidden
    temporary folder beside it, given to `check` (which raises to stop), then renamed into place; an earlier
    export there is replaced last."""
    from safetensors.torch import save_file

    temp = folder.parent / f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    old = temp.with_suffix(".old")
    name = ""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        temp.mkdir()
        for name, data in files.items():
            if isinstance(data, dict):
                save_file(data, temp / name, metadata={"format": "pt"})
                os.chmod(temp / name, new_file_mode())  # save_file's own temporary file is 0600
            else:
                (temp / name).write_bytes(data)
            with open(temp / name, "rb") as f:
                os.fsync(f.fileno())
        name = ""
        if check is not None:
            check(temp)
        if folder.exists():
            folder.rename(old)  # an earlier export (check_target allowed it): kept until the new one is in
        temp.rename(folder)
    except UserError:
        raise
    except Exception as e:  # whatever the writer raised: one line, the temporary folder gone first
        raise write_error(folder / name, e, "the transformers export; an earlier export there is untouched") from e
    finally:
        # Here, not in the except: a Ctrl-C between the two renames must not lose the earlier export either.
        if old.exists() and not folder.exists():
            old.rename(folder)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def run_export_hf(config: dict) -> None:
    """predict.py's export_hf: the model of model_path/phi into export_dir as a transformers folder."""
    from clip import CLIP
    from nets.configs import get_config

    folder = Path(config["export_dir"])
    if config["phi"] != "auto" and (reason := refusal(get_config(config["phi"]))):
        raise UserError(f"cannot export phi={config['phi']!r} to transformers: {reason}")
    check_target(folder)
    model = CLIP.from_config(config, letterbox_image=False, cuda=False, precision="fp32", runtime="torch")
    if reason := refusal(model.net.config):
        raise UserError(f"cannot export {config['model_path']} (phi={model.phi!r}) to transformers: {reason}")
    if config["letterbox_image"]:
        print(f"note: letterbox_image is not exported; transformers' image processor does the weights' own resize "
              f"({model.transform.preprocess.resize_mode})")
    files = export_files(model)

    def check(temp: Path) -> None:
        worst = compare(temp, model)
        if worst > TOLERANCE:
            raise UserError(f"transformers computes this model {worst:.2e} away from it (more than {TOLERANCE}); "
                            f"nothing was written to {folder}. Please report this with the phi and weights used")

    write_folder(folder, files, check)
    kind = transformers_class(model.net.config)
    print(f"wrote {', '.join(files)} to {folder}; load it with transformers.{kind}.from_pretrained({str(folder)!r}) "
          f"and {CLASSES[kind][0]}.from_pretrained({str(folder)!r})")
