"""Weights by name: open_clip's tags, `hf-hub:ORG/NAME` and URLs, located as a local file and the phi that reads it.

The table holds one row per (architecture, tag) of open_clip 3.3's pretrained table for the towers this project
builds (OpenAI's ViT and ModifiedResNet image towers with the OpenAI text tower; SigLIP's timm and text towers;
ConvNeXt's, EVA's, ViTamin's, PE-Core's and MobileCLIP's timm towers; open_clip's HFTextEncoder text towers:
RoBERTa, XLM-R, NLLB). Each row names its source and
the activation the weights were trained with: open_clip keeps that apart from the config name (`ViT-B-32` is
GELU, but its `openai`, MetaCLIP and some DFN tags are QuickGELU), and loading with the other one gives wrong
features with no error.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from nets.configs import MODEL_CONFIGS, get_config
from nets.open_clip_configs import HF_TOKENIZERS
from utils.checks import is_weight_name
from utils.data.preprocess import INCEPTION_MEAN, INCEPTION_STD, OPENAI, Preprocess
from utils.errors import UserError
from utils.tokenizer import HUB_TOKENIZER_FILES, SIGLIP_TOKENIZER_FILES, TOKENIZER_CONFIG_FILES, XLM_SENTENCEPIECE
from utils.weights.download import DownloadError, fetch_hub, fetch_url
from utils.weights.folders import find_layout

QUICK_GELU, GELU = "quick_gelu", "gelu"
_OPENAI = "https://openaipublic.azureedge.net/clip/models/"
_OPEN_CLIP = "https://github.com/mlfoundations/open_clip/releases/download/v0.2-weights/"

# (architecture, tag, source, activation). Sources are OpenAI's URLs for the `openai` tags (the sha256 is in
# their path) and the hub repos open_clip reads for the others (safetensors there, so nothing is unpickled).
# ViT-B-16-plus-240 laion400m_e32 is open_clip's release URL: its hub entry in open_clip points at the e31 repo.
_ROWS = (
    ("RN50", "openai", _OPENAI + "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
     QUICK_GELU),
    ("RN50", "yfcc15m", "hf-hub:timm/resnet50_clip.yfcc15m", QUICK_GELU),
    ("RN50", "cc12m", "hf-hub:timm/resnet50_clip.cc12m", QUICK_GELU),
    ("RN101", "openai", _OPENAI + "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
     QUICK_GELU),
    ("RN101", "yfcc15m", "hf-hub:timm/resnet101_clip.yfcc15m", QUICK_GELU),
    ("RN50x4", "openai", _OPENAI + "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
     QUICK_GELU),
    ("RN50x16", "openai", _OPENAI + "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
     QUICK_GELU),
    ("RN50x64", "openai", _OPENAI + "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
     QUICK_GELU),
    ("ViT-B-32", "openai",
     _OPENAI + "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt", QUICK_GELU),
    ("ViT-B-32", "laion400m_e31", "hf-hub:timm/vit_base_patch32_clip_224.laion400m_e31", QUICK_GELU),
    ("ViT-B-32", "laion400m_e32", "hf-hub:timm/vit_base_patch32_clip_224.laion400m_e32", QUICK_GELU),
    ("ViT-B-32", "laion2b_e16", "hf-hub:timm/vit_base_patch32_clip_224.laion2b_e16", GELU),
    ("ViT-B-32", "laion2b_s34b_b79k", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", GELU),
    ("ViT-B-32", "datacomp_xl_s13b_b90k", "hf-hub:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K", GELU),
    ("ViT-B-32", "datacomp_m_s128m_b4k", "hf-hub:laion/CLIP-ViT-B-32-DataComp.M-s128M-b4K", GELU),
    ("ViT-B-32", "commonpool_m_clip_s128m_b4k", "hf-hub:laion/CLIP-ViT-B-32-CommonPool.M.clip-s128M-b4K", GELU),
    ("ViT-B-32", "commonpool_m_laion_s128m_b4k", "hf-hub:laion/CLIP-ViT-B-32-CommonPool.M.laion-s128M-b4K", GELU),
    ("ViT-B-32", "commonpool_m_image_s128m_b4k", "hf-hub:laion/CLIP-ViT-B-32-CommonPool.M.image-s128M-b4K", GELU),
    ("ViT-B-32", "commonpool_m_text_s128m_b4k", "hf-hub:laion/CLIP-ViT-B-32-CommonPool.M.text-s128M-b4K", GELU),
    ("ViT-B-32", "commonpool_m_basic_s128m_b4k", "hf-hub:laion/CLIP-ViT-B-32-CommonPool.M.basic-s128M-b4K", GELU),
    ("ViT-B-32", "commonpool_m_s128m_b4k", "hf-hub:laion/CLIP-ViT-B-32-CommonPool.M-s128M-b4K", GELU),
    ("ViT-B-32", "datacomp_s_s13m_b4k", "hf-hub:laion/CLIP-ViT-B-32-DataComp.S-s13M-b4K", GELU),
    ("ViT-B-32", "commonpool_s_clip_s13m_b4k", "hf-hub:laion/CLIP-ViT-B-32-CommonPool.S.clip-s13M-b4K", GELU),
    ("ViT-B-32", "commonpool_s_laion_s13m_b4k", "hf-hub:laion/CLIP-ViT-B-32-CommonPool.S.laion-s13M-b4K", GELU),
    ("ViT-B-32", "commonpool_s_image_s13m_b4k", "hf-hub:laion/CLIP-ViT-B-32-CommonPool.S.image-s13M-b4K", GELU),
    ("ViT-B-32", "commonpool_s_text_s13m_b4k", "hf-hub:laion/CLIP-ViT-B-32-CommonPool.S.text-s13M-b4K", GELU),
    ("ViT-B-32", "commonpool_s_basic_s13m_b4k", "hf-hub:laion/CLIP-ViT-B-32-CommonPool.S.basic-s13M-b4K", GELU),
    ("ViT-B-32", "commonpool_s_s13m_b4k", "hf-hub:laion/CLIP-ViT-B-32-CommonPool.S-s13M-b4K", GELU),
    ("ViT-B-32", "metaclip_400m", "hf-hub:timm/vit_base_patch32_clip_224.metaclip_400m", QUICK_GELU),
    ("ViT-B-32", "metaclip_fullcc", "hf-hub:timm/vit_base_patch32_clip_224.metaclip_2pt5b", QUICK_GELU),
    ("ViT-B-32-256", "datacomp_s34b_b86k", "hf-hub:laion/CLIP-ViT-B-32-256x256-DataComp-s34B-b86K", GELU),
    ("ViT-B-16", "openai",
     _OPENAI + "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt", QUICK_GELU),
    ("ViT-B-16", "laion400m_e31", "hf-hub:timm/vit_base_patch16_clip_224.laion400m_e31", GELU),
    ("ViT-B-16", "laion400m_e32", "hf-hub:timm/vit_base_patch16_clip_224.laion400m_e32", GELU),
    ("ViT-B-16", "laion2b_s34b_b88k", "hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K", GELU),
    ("ViT-B-16", "datacomp_xl_s13b_b90k", "hf-hub:laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K", GELU),
    ("ViT-B-16", "datacomp_l_s1b_b8k", "hf-hub:laion/CLIP-ViT-B-16-DataComp.L-s1B-b8K", GELU),
    ("ViT-B-16", "commonpool_l_clip_s1b_b8k", "hf-hub:laion/CLIP-ViT-B-16-CommonPool.L.clip-s1B-b8K", GELU),
    ("ViT-B-16", "commonpool_l_laion_s1b_b8k", "hf-hub:laion/CLIP-ViT-B-16-CommonPool.L.laion-s1B-b8K", GELU),
    ("ViT-B-16", "commonpool_l_image_s1b_b8k", "hf-hub:laion/CLIP-ViT-B-16-CommonPool.L.image-s1B-b8K", GELU),
    ("ViT-B-16", "commonpool_l_text_s1b_b8k", "hf-hub:laion/CLIP-ViT-B-16-CommonPool.L.text-s1B-b8K", GELU),
    ("ViT-B-16", "commonpool_l_basic_s1b_b8k", "hf-hub:laion/CLIP-ViT-B-16-CommonPool.L.basic-s1B-b8K", GELU),
    ("ViT-B-16", "commonpool_l_s1b_b8k", "hf-hub:laion/CLIP-ViT-B-16-CommonPool.L-s1B-b8K", GELU),
    ("ViT-B-16", "dfn2b", "hf-hub:apple/DFN2B-CLIP-ViT-B-16", QUICK_GELU),
    ("ViT-B-16", "metaclip_400m", "hf-hub:timm/vit_base_patch16_clip_224.metaclip_400m", QUICK_GELU),
    ("ViT-B-16", "metaclip_fullcc", "hf-hub:timm/vit_base_patch16_clip_224.metaclip_2pt5b", QUICK_GELU),
    ("ViT-B-16-plus-240", "laion400m_e31", "hf-hub:timm/vit_base_patch16_plus_clip_240.laion400m_e31", GELU),
    ("ViT-B-16-plus-240", "laion400m_e32", _OPEN_CLIP + "vit_b_16_plus_240-laion400m_e32-699c4b84.pt", GELU),
    ("ViT-L-14", "openai",
     _OPENAI + "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt", QUICK_GELU),
    ("ViT-L-14", "laion400m_e31", "hf-hub:timm/vit_large_patch14_clip_224.laion400m_e31", GELU),
    ("ViT-L-14", "laion400m_e32", "hf-hub:timm/vit_large_patch14_clip_224.laion400m_e32", GELU),
    ("ViT-L-14", "laion2b_s32b_b82k", "hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K", GELU),
    ("ViT-L-14", "datacomp_xl_s13b_b90k", "hf-hub:laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K", GELU),
    ("ViT-L-14", "commonpool_xl_clip_s13b_b90k", "hf-hub:laion/CLIP-ViT-L-14-CommonPool.XL.clip-s13B-b90K", GELU),
    ("ViT-L-14", "commonpool_xl_laion_s13b_b90k", "hf-hub:laion/CLIP-ViT-L-14-CommonPool.XL.laion-s13B-b90K", GELU),
    ("ViT-L-14", "commonpool_xl_s13b_b90k", "hf-hub:laion/CLIP-ViT-L-14-CommonPool.XL-s13B-b90K", GELU),
    ("ViT-L-14", "metaclip_400m", "hf-hub:timm/vit_large_patch14_clip_224.metaclip_400m", QUICK_GELU),
    ("ViT-L-14", "metaclip_fullcc", "hf-hub:timm/vit_large_patch14_clip_224.metaclip_2pt5b", QUICK_GELU),
    ("ViT-L-14", "dfn2b", "hf-hub:apple/DFN2B-CLIP-ViT-L-14", QUICK_GELU),
    ("ViT-L-14", "dfn2b_s39b", "hf-hub:apple/DFN2B-CLIP-ViT-L-14-39B", GELU),
    ("ViT-L-14-336", "openai",
     _OPENAI + "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt", QUICK_GELU),
    ("ViT-H-14", "laion2b_s32b_b79k", "hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K", GELU),
    ("ViT-H-14", "metaclip_fullcc", "hf-hub:timm/vit_huge_patch14_clip_224.metaclip_2pt5b", QUICK_GELU),
    ("ViT-H-14", "metaclip_altogether", "hf-hub:timm/vit_huge_patch14_clip_224.metaclip_altogether", GELU),
    ("ViT-H-14", "dfn5b", "hf-hub:apple/DFN5B-CLIP-ViT-H-14", QUICK_GELU),
    ("ViT-H-14-378", "dfn5b", "hf-hub:apple/DFN5B-CLIP-ViT-H-14-378", QUICK_GELU),
    ("ViT-g-14", "laion2b_s12b_b42k", "hf-hub:laion/CLIP-ViT-g-14-laion2B-s12B-b42K", GELU),
    ("ViT-g-14", "laion2b_s34b_b88k", "hf-hub:laion/CLIP-ViT-g-14-laion2B-s34B-b88K", GELU),
    ("ViT-bigG-14", "laion2b_s39b_b160k", "hf-hub:laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", GELU),
    ("ViT-bigG-14", "metaclip_fullcc", "hf-hub:timm/vit_gigantic_patch14_clip_224.metaclip_2pt5b", QUICK_GELU),
)

# open_clip 3.3's 26 SigLIP / SigLIP 2 pairs, all tag `webli`, from timm's hub repos (open_clip layout, with the
# tokenizer files beside the weights). open_clip reads SO400M-14-SigLIP-378's weights from the -384 repo.
_SIGLIP_REPOS = {
    **{a: f"timm/{a}" for a in (
        "ViT-B-16-SigLIP", "ViT-B-16-SigLIP-256", "ViT-B-16-SigLIP-i18n-256", "ViT-B-16-SigLIP-384",
        "ViT-B-16-SigLIP-512", "ViT-L-16-SigLIP-256", "ViT-L-16-SigLIP-384", "ViT-SO400M-14-SigLIP",
        "ViT-SO400M-16-SigLIP-i18n-256", "ViT-SO400M-14-SigLIP-384", "ViT-B-32-SigLIP2-256", "ViT-B-16-SigLIP2",
        "ViT-B-16-SigLIP2-256", "ViT-B-16-SigLIP2-384", "ViT-B-16-SigLIP2-512", "ViT-L-16-SigLIP2-256",
        "ViT-L-16-SigLIP2-384", "ViT-L-16-SigLIP2-512", "ViT-SO400M-14-SigLIP2", "ViT-SO400M-14-SigLIP2-378",
        "ViT-SO400M-16-SigLIP2-256", "ViT-SO400M-16-SigLIP2-384", "ViT-SO400M-16-SigLIP2-512",
        "ViT-gopt-16-SigLIP2-256", "ViT-gopt-16-SigLIP2-384")},
    "ViT-SO400M-14-SigLIP-378": "timm/ViT-SO400M-14-SigLIP-384",
}
_ROWS += tuple((a, "webli", f"hf-hub:{repo}", GELU) for a, repo in _SIGLIP_REPOS.items())
# open_clip 3.3's 7 CLIPA pairs, from UCSC-VLAA's hub repos (open_clip layout).
_CLIPA_REPOS = {("ViT-L-14-CLIPA", "datacomp1b"): "ViT-L-14-CLIPA-datacomp1B",
                ("ViT-L-14-CLIPA-336", "datacomp1b"): "ViT-L-14-CLIPA-336-datacomp1B",
                ("ViT-H-14-CLIPA", "datacomp1b"): "ViT-H-14-CLIPA-datacomp1B",
                ("ViT-H-14-CLIPA-336", "laion2b"): "ViT-H-14-CLIPA-336-laion2B",
                ("ViT-H-14-CLIPA-336", "datacomp1b"): "ViT-H-14-CLIPA-336-datacomp1B",
                ("ViT-bigG-14-CLIPA", "datacomp1b"): "ViT-bigG-14-CLIPA-datacomp1B",
                ("ViT-bigG-14-CLIPA-336", "datacomp1b"): "ViT-bigG-14-CLIPA-336-datacomp1B"}
_ROWS += tuple((a, t, f"hf-hub:UCSC-VLAA/{repo}", GELU) for (a, t), repo in _CLIPA_REPOS.items())
# CLIPA's: ImageNet's mean and std, bilinear, squashed to the square.
CLIPA_PREPROCESS = Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear",
                              resize_mode="squash")
# open_clip 3.3's ConvNeXt and EVA pairs (the timm towers of nets/zoo_rows.py): GELU, OpenAI's preprocessing, open_clip
# layout on the hub (LAION's repos for ConvNeXt, timm's for EVA).
_ROWS += tuple((a, t, f"hf-hub:{repo}", GELU) for a, t, repo in (
    ("convnext_base", "laion400m_s13b_b51k", "laion/CLIP-convnext_base-laion400M-s13B-b51K"),
    ("convnext_base_w", "laion2b_s13b_b82k", "laion/CLIP-convnext_base_w-laion2B-s13B-b82K"),
    ("convnext_base_w", "laion2b_s13b_b82k_augreg", "laion/CLIP-convnext_base_w-laion2B-s13B-b82K-augreg"),
    ("convnext_base_w", "laion_aesthetic_s13b_b82k", "laion/CLIP-convnext_base_w-laion_aesthetic-s13B-b82K"),
    ("convnext_base_w_320", "laion_aesthetic_s13b_b82k", "laion/CLIP-convnext_base_w_320-laion_aesthetic-s13B-b82K"),
    ("convnext_base_w_320", "laion_aesthetic_s13b_b82k_augreg",
     "laion/CLIP-convnext_base_w_320-laion_aesthetic-s13B-b82K-augreg"),
    ("convnext_large_d", "laion2b_s26b_b102k_augreg", "laion/CLIP-convnext_large_d.laion2B-s26B-b102K-augreg"),
    ("convnext_large_d_320", "laion2b_s29b_b131k_ft", "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft"),
    ("convnext_large_d_320", "laion2b_s29b_b131k_ft_soup",
     "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup"),
    ("convnext_xxlarge", "laion2b_s34b_b82k_augreg", "laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg"),
    ("convnext_xxlarge", "laion2b_s34b_b82k_augreg_rewind",
     "laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-rewind"),
    ("convnext_xxlarge", "laion2b_s34b_b82k_augreg_soup", "laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup"),
    ("EVA01-g-14", "laion400m_s11b_b41k", "timm/eva_giant_patch14_clip_224.laion400m_s11b_b41k"),
    ("EVA01-g-14-plus", "merged2b_s11b_b114k", "timm/eva_giant_patch14_plus_clip_224.merged2b_s11b_b114k"),
    ("EVA02-B-16", "merged2b_s8b_b131k", "timm/eva02_base_patch16_clip_224.merged2b_s8b_b131k"),
    ("EVA02-L-14", "merged2b_s4b_b131k", "timm/eva02_large_patch14_clip_224.merged2b_s4b_b131k"),
    ("EVA02-L-14-336", "merged2b_s6b_b61k", "timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k"),
    ("EVA02-E-14", "laion2b_s4b_b115k", "timm/eva02_enormous_patch14_clip_224.laion2b_s4b_b115k"),
    ("EVA02-E-14-plus", "laion2b_s9b_b144k", "timm/eva02_enormous_patch14_plus_clip_224.laion2b_s9b_b144k"),
))
# ViTamin's (single pickled files in its author's repos: open_clip's keys, read with the phi named), PE-Core's and
# MobileCLIP's (open_clip layout on the hub).
_VITAMIN_FILES = {"ViTamin-S": "ViTamin-S", "ViTamin-S-LTT": "ViTamin-S-LTT", "ViTamin-B": "ViTamin-B",
                  "ViTamin-B-LTT": "ViTamin-B-LTT", **{f"ViTamin-{s}{px}": f"ViTamin-{s}-{px[1:] or '224'}px"
                                                        for s in ("L", "L2") for px in ("", "-256", "-336", "-384")},
                  **{f"ViTamin-XL-{px}": f"ViTamin-XL-{px}px" for px in ("256", "336", "384")}}
_ROWS += tuple((a, "datacomp1b", f"hf-hub:jienengchen/{repo}/pytorch_model.bin", GELU)
               for a, repo in _VITAMIN_FILES.items())
_PE_CORE = ("PE-Core-T-16-384", "PE-Core-S-16-384", "PE-Core-B-16", "PE-Core-L-14-336", "PE-Core-bigG-14-448")
_ROWS += tuple((a, "meta", f"hf-hub:timm/{a}", GELU) for a in _PE_CORE)
_MOBILECLIP = (("MobileCLIP-B", "datacompdr", "apple/MobileCLIP-B-OpenCLIP"),
               ("MobileCLIP-B", "datacompdr_lt", "apple/MobileCLIP-B-LT-OpenCLIP"),
               ("MobileCLIP2-B", "dfndr2b", "timm/MobileCLIP2-B-OpenCLIP"),
               ("MobileCLIP-S1", "datacompdr", "apple/MobileCLIP-S1-OpenCLIP"),
               ("MobileCLIP-S2", "datacompdr", "apple/MobileCLIP-S2-OpenCLIP"),
               ("MobileCLIP2-S0", "dfndr2b", "timm/MobileCLIP2-S0-OpenCLIP"),
               ("MobileCLIP2-S2", "dfndr2b", "timm/MobileCLIP2-S2-OpenCLIP"))
# MobileCLIP2-S3, -S4 and -L-14 were trained on OpenAI-normalised pixels (open_clip's `_mc2cfg`), the others on [0, 1].
_MOBILECLIP2 = (("MobileCLIP2-S3", "dfndr2b", "timm/MobileCLIP2-S3-OpenCLIP"),
                ("MobileCLIP2-S4", "dfndr2b", "timm/MobileCLIP2-S4-OpenCLIP"),
                ("MobileCLIP2-L-14", "dfndr2b", "timm/MobileCLIP2-L-14-OpenCLIP"))
_ROWS += tuple((a, t, f"hf-hub:{repo}", GELU) for a, t, repo in _MOBILECLIP + _MOBILECLIP2)
# open_clip's HFTextEncoder models (nets/hf_rows.py): LAION's RoBERTa / XLM-R ones and visheratin's NLLB-CLIPs, open_clip
# layout on the hub; roberta-ViT-B-32's ViT was trained with QuickGELU (its config's quick_gelu).
_HF_TEXT = (("roberta-ViT-B-32", "laion2b_s12b_b32k", "laion/CLIP-ViT-B-32-roberta-base-laion2B-s12B-b32k", QUICK_GELU),
            ("xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k", "laion/CLIP-ViT-B-32-xlm-roberta-base-laion5B-s13B-b90k",
             GELU),
            ("xlm-roberta-large-ViT-H-14", "frozen_laion5b_s13b_b90k",
             "laion/CLIP-ViT-H-14-frozen-xlm-roberta-large-laion5B-s13B-b90k", GELU),
            ("nllb-clip-base", "v1", "visheratin/nllb-clip-base-oc", GELU),
            ("nllb-clip-large", "v1", "visheratin/nllb-clip-large-oc", GELU))
# The SigLIP-trunk NLLB-CLIPs: SigLIP's preprocessing (open_clip's _slpcfg).
_NLLB_SIGLIP = (("nllb-clip-base-siglip", "v1", "visheratin/nllb-clip-base-siglip"),
                ("nllb-clip-base-siglip", "mrl", "visheratin/nllb-siglip-mrl-base"),
                ("nllb-clip-large-siglip", "v1", "visheratin/nllb-clip-large-siglip"),
                ("nllb-clip-large-siglip", "mrl", "visheratin/nllb-siglip-mrl-large"))
_ROWS += tuple((a, t, f"hf-hub:{repo}", act) for a, t, repo, act in _HF_TEXT)
_ROWS += tuple((a, t, f"hf-hub:{repo}", GELU) for a, t, repo in _NLLB_SIGLIP)
# open_clip 3.3's CoCa pairs: LAION's hub repos (open_clip layout), GELU, OpenAI's preprocessing.
_COCA = (("coca_ViT-B-32", "CoCa-ViT-B-32"), ("coca_ViT-L-14", "CoCa-ViT-L-14"))
_ROWS += tuple((a, t, f"hf-hub:laion/{prefix}{repo}-laion2B-s13B-b90k", GELU) for a, repo in _COCA
               for t, prefix in (("laion2b_s13b_b90k", ""), ("mscoco_finetuned_laion2b_s13b_b90k", "mscoco_finetuned_")))
# open_clip 3.3's MetaCLIP 2 pairs (timm's hub repos, open_clip layout): the 224 px ViT-H trained with QuickGELU, the
# others with GELU (open_clip's notes); OpenAI's preprocessing, the 378 px ones squashed to the square.
_WORLDWIDE = (("ViT-H-14-worldwide", "vit_huge_patch14_clip_224", QUICK_GELU),
              ("ViT-H-14-worldwide-378", "vit_huge_patch14_clip_378", GELU),
              ("ViT-bigG-14-worldwide", "vit_gigantic_patch14_clip_224", GELU),
              ("ViT-bigG-14-worldwide-378", "vit_gigantic_patch14_clip_378", GELU))
_ROWS += tuple((a, "metaclip2_worldwide", f"hf-hub:timm/{repo}.metaclip2_worldwide", act)
               for a, repo, act in _WORLDWIDE)
# big_vision's: images squashed to the square (no crop), bicubic, scaled to [-1, 1].
SIGLIP_PREPROCESS = Preprocess(mean=INCEPTION_MEAN, std=INCEPTION_STD, resize_mode="squash")

# open_clip 3.3's per-tag preprocessing where it is not OpenAI's (its `_pcfg(..., mean=INCEPTION_MEAN, ...)` and
# `resize_mode="squash"` entries); tests/test_download.py holds every row to open_clip's get_pretrained_cfg.
_PREPROCESS = {("ViT-L-14", "laion2b_s32b_b82k"): Preprocess(mean=INCEPTION_MEAN, std=INCEPTION_STD),
               ("ViT-H-14", "dfn5b"): Preprocess(resize_mode="squash"),
               ("ViT-H-14-378", "dfn5b"): Preprocess(resize_mode="squash"),
               **{(a, "webli"): SIGLIP_PREPROCESS for a in _SIGLIP_REPOS},
               **{key: CLIPA_PREPROCESS for key in _CLIPA_REPOS},
               # PE-Core: [-1, 1] pixels, bilinear, squashed; MobileCLIP: [0, 1] pixels (no normalisation), bilinear.
               **{(a, "meta"): Preprocess(mean=INCEPTION_MEAN, std=INCEPTION_STD, interpolation="bilinear",
                                          resize_mode="squash") for a in _PE_CORE},
               **{(a, t): Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")
                  for a, t, _ in _MOBILECLIP},
               # MobileCLIP2-S3/S4: OpenAI's mean and std, bilinear; L-14: OpenAI's exactly (bicubic).
               **{(a, t): Preprocess(interpolation="bicubic" if a == "MobileCLIP2-L-14" else "bilinear")
                  for a, t, _ in _MOBILECLIP2},
               **{(a, t): SIGLIP_PREPROCESS for a, t, _ in _NLLB_SIGLIP},
               **{(a, "metaclip2_worldwide"): Preprocess(resize_mode="squash") for a, _, _ in _WORLDWIDE
                  if a.endswith("-378")}}

# This project's names of OpenAI's models (QuickGELU), read as open_clip's architecture names for tag lookups.
ALIASES = {"openai/VIT-B-32": "ViT-B-32", "openai/VIT-B-16": "ViT-B-16", "openai/VIT-L-14": "ViT-L-14",
           "openai/VIT-L-14-336": "ViT-L-14-336", "openai/RN50": "RN50", "openai/RN101": "RN101",
           "openai/RN50x4": "RN50x4", "openai/RN50x16": "RN50x16", "openai/RN50x64": "RN50x64"}
# The original's self-cn has ViT-B/32 as its image tower: train.py starts it from a tag's image tower plus BERT.
IMAGE_TOWER_OF = {"self-cn/VIT-B-32": "ViT-B-32"}


@dataclass(frozen=True)
class Pretrained:
    architecture: str  # open_clip's config name without `-quickgelu`
    tag: str
    source: str  # an https URL or hf-hub:ORG/NAME
    activation: str  # QUICK_GELU or GELU: what the weights were trained with
    preprocess: Preprocess = OPENAI  # what the weights were trained with, whatever their files say

    @property
    def sha256(self) -> str:
        """The checksum the URL publishes: OpenAI's 64 hex digits in the path, open_clip's 8 at the name's end."""
        if m := re.search(r"/([0-9a-f]{64})/[^/]+$", self.source):
            return m.group(1)
        m = re.search(r"-([0-9a-f]{8})\.pth?$", self.source)
        return m.group(1) if m and self.source.startswith(_OPEN_CLIP) else ""


PRETRAINED: dict[tuple[str, str], Pretrained] = {(a, t): Pretrained(a, t, s, act, _PREPROCESS.get((a, t), OPENAI))
                                                  for a, t, s, act in _ROWS}


class Located(NamedTuple):
    path: Path  # a local weight file or folder
    phi: str  # the phi to build: the one asked for, or its variant with the weights' activation
    preprocess: Preprocess | None = None  # a pretrained row's record, which wins over the files'


def clean_tag(tag: str) -> str:
    return tag.lower().replace("-", "_")


def architecture_of(phi: str) -> str:
    return IMAGE_TOWER_OF.get(phi) or ALIASES.get(phi, phi).removesuffix("-quickgelu")


def tags_of(phi: str) -> list[str]:
    arch = architecture_of(phi)
    return [t for a, t in PRETRAINED if a == arch]


def _is_quick(value) -> bool:
    return str(value).lower().replace("_", "").replace("-", "") == "quickgelu"


def activation_of(phi: str) -> str:
    """The activation open_clip's quick_gelu switch sets: the OpenAI text tower's (a ResNet image tower has none
    of its own), or the ViT's where the text tower is transformers' (BERT, RoBERTa, ...), whose activation is fixed."""
    config = get_config(phi)
    tower = config.vision if config.text.own_activation else config.text
    # A table without the activation field holds QuickGELU towers only, as the project's first towers were.
    return QUICK_GELU if _is_quick(getattr(tower, "activation", QUICK_GELU)) else GELU


def phi_with_activation(phi: str, activation: str, source: str) -> str:
    """`phi`, or its `-quickgelu` / plain sibling, whichever has `activation`; one line says so when it changes."""
    if phi == "auto" or phi not in MODEL_CONFIGS:
        return phi
    base = ALIASES.get(phi, phi).removesuffix("-quickgelu")
    for candidate in (phi, base, base + "-quickgelu"):
        if candidate in MODEL_CONFIGS and activation_of(candidate) == activation:
            if candidate != phi:
                print(f"{source} was trained with {activation}: building phi={candidate} instead of {phi}",
                      file=sys.stderr)
            return candidate
    raise UserError(f"{source} was trained with {activation}, but phi={phi} uses {activation_of(phi)} and the "
                    f"table has no {activation} variant of it; loading would give wrong features")


def locate(model_path: str | Path, phi: str) -> Located:
    """model_path as written by the user -> the local weights (downloaded on first use) and the phi to build.

    An existing file or folder comes first; then `hf-hub:ORG/NAME[/FILE][@REVISION]`, an http(s) URL (with an
    optional `#sha256=HEX`), or a pretrained tag of phi's architecture (`openai`, `laion2b_s34b_b79k`, ...).
    Anything else is returned as a path, for the reader's 'does not exist' message.
    """
    text = str(model_path)
    if not text or Path(text).exists():
        return Located(Path(text), phi)
    if text.startswith("hf-hub:"):
        # The reader checks phi against the open_clip_config.json / config.json fetched beside the weights.
        return Located(_hub_weights(text[len("hf-hub:"):]), phi)
    if re.match(r"https?://", text):
        return Located(fetch_url(text), phi)
    if not is_weight_name(text):
        return Located(Path(text), phi)
    tag = clean_tag(text)
    if phi == "auto":
        owners = sorted({a for a, t in PRETRAINED if t == tag})
        if owners:
            raise UserError(f"model_path {text!r} is a pretrained tag of {', '.join(owners)}: set phi to the "
                            "architecture (e.g. --phi " + owners[0] + "); phi='auto' cannot pick among them")
        return Located(Path(text), phi)
    get_config(phi)  # an unknown phi is the mistake to report, not the tag
    row = PRETRAINED.get((architecture_of(phi), tag))
    if row is None:
        known = tags_of(phi)
        raise UserError(f"model_path {text!r} is neither a file nor a pretrained tag of phi={phi}; "
                        + (f"its tags: {', '.join(known)}" if known else
                           "this phi has no pretrained weights by name (README, 'Weights')"))
    phi = phi_with_activation(phi, row.activation, f"{row.architecture} {row.tag}")
    try:
        if row.source.startswith("hf-hub:"):
            return Located(_hub_weights(row.source[len("hf-hub:"):]), phi, row.preprocess)
        return Located(fetch_url(row.source, row.sha256, use_mirror=True), phi, row.preprocess)
    except DownloadError as e:
        raise DownloadError(f"{row.architecture} {row.tag}: {e}") from e


def _split_hub(spec: str) -> tuple[str, str, str | None]:
    spec, _, revision = spec.partition("@")
    parts = spec.strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise UserError(f"hf-hub:{spec} is not a hub repo; write hf-hub:ORG/NAME (optionally /FILE and @REVISION)")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision or None


def _hub_weights(spec: str) -> Path:
    """The weight file (open_clip layout, its config beside it) or the transformers folder of a hub repo."""
    repo, filename, revision = _split_hub(spec)
    if filename:
        path = fetch_hub(repo, filename, revision)
        if path is None:
            raise UserError(f"hub repo {repo} has no file {filename}")
        return path

    def optional(name: str) -> Path | None:
        try:
            return fetch_hub(repo, name, revision)
        except DownloadError:  # offline with a repo fetched before this file was asked for
            return None

    layout = find_layout(lambda name: fetch_hub(repo, name, revision), f"hub repo {repo}", optional=optional)
    if layout is None:
        raise UserError(f"hub repo {repo} has neither open_clip_config.json (open_clip) nor config.json "
                        "(transformers); name the weight file: hf-hub:ORG/NAME/FILE")
    if _names_a_tokenizer(layout.kind, layout.config):
        # SigLIP's tokenizer comes from its repo's files (no call for hf_tokenizer_name later): fetched beside the
        # weights now, so a later run without a network finds them in the cache. tokenizer.json, else a
        # sentencepiece model.
        for name in TOKENIZER_CONFIG_FILES:
            optional(name)
        next((path for name in (*SIGLIP_TOKENIZER_FILES, XLM_SENTENCEPIECE) if (path := optional(name)) is not None),
             None)
        if (named := _hf_tokenizer_name(layout.kind, layout.config)) in HF_TOKENIZERS:
            # CLIPA's bert-base-uncased lives in its own repo: its files go to the cache, where the tokenizer looks.
            for name in (*HUB_TOKENIZER_FILES, *TOKENIZER_CONFIG_FILES):
                try:
                    fetch_hub(named, name, None)
                except DownloadError:
                    pass
    return layout.weights[0] if layout.kind == "open_clip" else layout.folder


def _names_a_tokenizer(kind: str, config: Path) -> bool:
    """Whether the config is SigLIP's, whose tokenizer files are its repo's: open_clip's names a hub tokenizer, a
    transformers folder is a SiglipModel."""
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
        if kind != "open_clip":
            return data.get("model_type") in ("siglip", "metaclip_2", "altclip")
        text = data["model_cfg"]["text_cfg"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False  # the reader reports an unreadable config
    return bool(isinstance(text, dict) and text.get("hf_tokenizer_name"))


def _hf_tokenizer_name(kind: str, config: Path) -> str:
    """An open_clip config's hf_tokenizer_name ("" for none, or a transformers folder)."""
    try:
        text = json.loads(config.read_text(encoding="utf-8"))["model_cfg"]["text_cfg"] if kind == "open_clip" else {}
    except (OSError, ValueError, KeyError, TypeError):
        return ""  # the reader reports an unreadable config
    return str(text.get("hf_tokenizer_name") or "") if isinstance(text, dict) else ""
