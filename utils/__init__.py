"""Everything the scripts use, grouped by job (README, "Where things are").

On top, the original repo's names: `dataloader`, `tokenizer`, `metrics`, `callbacks`; the shared ground:
`errors`, `config`, `device`, `files`; `prompts` (zero-shot prompt templates). Folders: `data/` (images,
augmentation, pre-flight, caption sources), `weights/` (reading and converting weight files), `train/`, `eval/`,
`finetune/`, `export/`, `predict/`, `web/`. Imports run one way, checked by tests/test_layers.py.
"""
import os

# PyTorch's OpenMP threads spin at every parallel op by default; when another process holds a core, each op then
# waits for a descheduled partner (ViT-B/32, one image, 2 threads on 2 cores with one busy: 1.1/s spinning,
# 17.9/s sleeping; batch 32: 15.0/s and 22.4/s). Set before torch loads OpenMP; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
