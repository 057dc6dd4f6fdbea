"""mode="caption": a CoCa writes a caption for every image under a folder into a caption file train.py reads (the
original's JSON list: {"image": path relative to the folder, "caption": [text]}), in batches. A rerun keeps every
entry the file holds and captions only the images it lacks, so an interrupted run resumes and nothing the user wrote
is replaced. Torch is imported by the functions that need it: `existing_captions` runs before the model loads."""
from __future__ import annotations

import json
import time
from pathlib import Path

from utils.errors import UserError

SAVE_EVERY_S = 30.0  # a long run writes what it has this often (and at the end), so a crash loses little


def caption_path(config: dict) -> Path:
    """`--output`, else captions_<run folder>_<weights>_<folder>.json in dir_save_path, as dir_predict's CSV."""
    if config["output"]:
        return Path(config["output"])
    from utils.files import output_name

    name = output_name(config["model_path"], Path(config["dir_origin_path"]).resolve().name)
    return Path(config["dir_save_path"]) / f"captions_{name}.json"


def existing_captions(path: Path) -> list[dict]:
    """The entries of a caption file written before (none when it does not exist); refused in one line when it is
    not a JSON list of {"image": ..., "caption": ...} objects, which a rerun would have to overwrite."""
    if not path.exists():
        return []
    if not path.is_file():
        raise UserError(f"output {path} is a folder; give the path of a .json caption file")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"output {path} exists but is not a JSON caption list ({e}); give another --output") from e
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "image" in e and "caption" in e
                                                for e in entries):
        raise UserError(f"output {path} exists but is not a list of {{\"image\": ..., \"caption\": ...}} entries; "
                        "give another --output")
    return entries


def _write(entries: list[dict], path: Path) -> None:
    from utils.files import atomic_write_bytes

    atomic_write_bytes(json.dumps(entries, ensure_ascii=False, indent=1).encode("utf-8"), path)


def caption_folder(model, folder: str | Path, out: str | Path, settings, batch_size: int = 32,
                   threads: int | None = None, seed: int = 0) -> tuple[Path, int, int, list[str]]:
    """Caption the images under `folder` that `out` lacks, appending them to it. `model` is clip.CLIP with a CoCa
    net; `settings` a utils.predict.generate.Generation. Returns (out, captioned now, kept from before, problems)."""
    import torch
    from tqdm import tqdm

    from utils.files import check_writable
    from utils.predict.folder import images_under
    from utils.predict.generate import captions, generate

    if not getattr(model.net, "writes_captions", False):
        raise UserError(f"mode caption needs a CoCa (a model with a caption decoder), and {model.phi} has none; use "
                        "--phi coca_ViT-B-32 --model_path mscoco_finetuned_laion2b_s13b_b90k (or laion2b_s13b_b90k)")
    folder, out = Path(folder), Path(out)
    check_writable(out.parent if str(out.parent) else Path("."), "output")
    entries = existing_captions(out)
    done = {str(e["image"]) for e in entries}
    paths = [p for p in images_under(folder) if p.relative_to(folder).as_posix() not in done]
    kept, added, saved = len(entries), 0, time.monotonic()
    tokenizer = model.tokenizer
    generator = torch.Generator(device=model.device).manual_seed(seed)
    try:
        with tqdm(total=len(paths), desc="captions", unit="img") as bar:
            batches = model.pipeline.batches(paths, batch_size, threads, progress=bar.update)
            for positions, pixels in batches:
                ids = generate(model.net, pixels, tokenizer.sot_token_id, tokenizer.eot_token_id, settings,
                               generator=generator)
                for i, text in zip(positions, captions(tokenizer, ids)):
                    entries.append({"image": paths[i].relative_to(folder).as_posix(), "caption": [text]})
                    added += 1
                if time.monotonic() - saved > SAVE_EVERY_S:
                    _write(entries, out)
                    saved = time.monotonic()
    finally:
        if added:  # what was captioned before an interruption stays, and a rerun goes on from there
            _write(entries, out)
    problems = [f"{path}: {why}" for path, why in batches.unreadable]
    return out, added, kept, problems
