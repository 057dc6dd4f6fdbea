"""Everything the scripts use, grouped by job (README, "Where things are").

On top, the original repo's names: `dataloader`, `tokenizer`, `metrics`, `callbacks`; the shared ground:
`errors`, `config`, `device`, `files`; `prompts` (zero-shot prompt templates). Folders: `data/` (images,
augmentation, pre-flight, caption sources), `weights/` (reading and converting weight files), `train/`, `eval/`,
`finetune/`, `export/`, `predict/`, `web/`. Imports run one way, checked by tests/test_layers.py.
"""
