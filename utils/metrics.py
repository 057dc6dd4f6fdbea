"""Image-text retrieval metrics: recall@K and rank statistics, as reported by the original repo's `itm_eval`.

A query's rank is the number of candidates scoring strictly higher than its ground truth (0 = retrieved
first). Without ties this is the ground truth's position in `np.argsort(score)[::-1]`, which is what the
original used; with ties the argsort position depends on the sort's tie order, so ties are instead resolved
in the query's favour, identically in both entry points. An image's ground truth is its best-scoring
caption: the count is monotone in the threshold, so counting captions above that one caption gives the
minimum over all of the image's captions.
"""
from __future__ import annotations

import math
from itertools import chain
from typing import Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch

RECALL_KS = (1, 5, 10)

# Blocks of scores that itm_eval copies at a time, so that evaluating never doubles the caller's matrix.
_ITM_EVAL_BLOCK_ELEMENTS = 2**22

_INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

Scores = np.ndarray | torch.Tensor
# txt2img[c] = caption c's image; img2txt[i] = image i's captions: sequences, arrays, tensors, or the
# original's dicts keyed by id.
Indices = Sequence[int] | np.ndarray | torch.Tensor | Mapping[int, int]
CaptionLists = Sequence[Sequence[int]] | np.ndarray | torch.Tensor | Mapping[int, Sequence[int]]


def small_val_warning(n_images: int, setting: str = "") -> str | None:
    """A warning when a validation set is too small for recall@K to mean much, else None. R@K is a hit among
    the best K of n images: below 10 x K images chance alone scores over 10%, and with K or fewer every query
    hits (2 val images: r_mean 100). `setting` says where to get more images."""
    weak = [k for k in RECALL_KS if n_images < 10 * k]
    if not weak:
        return None
    names = [f"R@{k}" for k in weak]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return (f"warning: the validation set has only {n_images} images, so {listed} mean{'s' if len(weak) == 1 else ''} "
            f"little (chance alone scores R@{weak[-1]} about {min(100.0, 100 * weak[-1] / max(n_images, 1)):.0f}%; "
            f"R@K needs at least 10 x K images, 100 for all three){f'. {setting}' if setting else ''}")


class _CaptionPairs(NamedTuple):
    """Every (image, caption) pair of img2txt, sorted by image; image i's pairs are offsets[i]:offsets[i + 1]."""

    images: torch.Tensor
    captions: torch.Tensor
    offsets: np.ndarray


def _indexed(ids: Mapping | Sequence | np.ndarray | torch.Tensor, n: int, name: str) -> Sequence:
    """A dict keyed 0..n-1 (the original's {caption_id: image_id} / {image_id: [caption_ids]}, keys also as
    the strings a JSON round trip leaves) as the list of its values in key order; anything else as it is."""
    if isinstance(ids, torch.Tensor):
        return ids.cpu().numpy()
    if not isinstance(ids, Mapping):
        return ids
    try:
        by_key = {int(key): value for key, value in ids.items()}
    except (TypeError, ValueError):
        raise ValueError(f"{name}'s keys must be integer ids, got {next(iter(ids))!r}") from None
    missing = sorted(set(range(n)) - set(by_key))
    if missing or len(by_key) != n:
        detail = f"id {missing[0]} is missing" if missing else f"ids outside [0, {n}) are present"
        raise ValueError(f"{name} must have one key per id 0..{n - 1}: {detail}")
    return [by_key[key] for key in range(n)]


def _caption_pairs(img2txt: CaptionLists, n_images: int, n_captions: int, device: torch.device) -> _CaptionPairs:
    img2txt = _indexed(img2txt, n_images, "img2txt")
    if len(img2txt) != n_images:
        raise ValueError(f"img2txt has {len(img2txt)} entries for {n_images} images")
    # An image with a single caption may list it as a bare id.
    img2txt = [np.atleast_1d(np.asarray(captions)) for captions in img2txt]
    counts = np.array([len(captions) for captions in img2txt], dtype=np.int64)
    if (counts == 0).any():
        raise ValueError(f"image {int(np.argmin(counts))} has no captions, so it has no rank")
    captions = np.array(list(chain.from_iterable(img2txt)))
    if captions.dtype.kind not in "iu":
        raise ValueError(f"img2txt must hold integer caption indices, got {captions.dtype}")
    if captions.min() < 0 or captions.max() >= n_captions:
        raise ValueError(f"img2txt holds caption indices outside [0, {n_captions})")
    images = np.repeat(np.arange(n_images), counts)
    offsets = np.concatenate(([0], np.cumsum(counts)))
    return _CaptionPairs(torch.from_numpy(images).to(device), torch.from_numpy(captions).long().to(device), offsets)


def _caption_images(txt2img: Indices, n_captions: int, n_images: int, device: torch.device) -> torch.Tensor:
    caption_images = torch.as_tensor(np.asarray(_indexed(txt2img, n_captions, "txt2img")))
    if caption_images.shape != (n_captions,):
        raise ValueError(f"txt2img has shape {tuple(caption_images.shape)}, expected ({n_captions},)")
    if caption_images.dtype not in _INDEX_DTYPES:
        raise ValueError(f"txt2img must hold integer image indices, got {caption_images.dtype}")
    if caption_images.min() < 0 or caption_images.max() >= n_images:
        raise ValueError(f"txt2img holds image indices outside [0, {n_images})")
    return caption_images.to(device=device, dtype=torch.long)


def _count_greater(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Per row, how many scores exceed that row's threshold. Overwrites `scores`."""
    # Summing the 0/1 floats that gt_ leaves in place is over 10x faster on CPU than summing a bool mask,
    # and exact while every partial count fits the mantissa.
    exact_dtype = torch.float64 if scores.dtype == torch.float32 and scores.shape[1] >= 2**24 else None
    return scores.gt_(thresholds).sum(1, dtype=exact_dtype).long()


def _image_ranks(scores: torch.Tensor, pairs: _CaptionPairs, first_image: int) -> torch.Tensor:
    """Ranks of images first_image, first_image + 1, ... from their scores against every caption (overwritten)."""
    lo, hi = pairs.offsets[first_image], pairs.offsets[first_image + len(scores)]
    rows = pairs.images[lo:hi] - first_image
    own_scores = scores[rows, pairs.captions[lo:hi]]
    best_own = own_scores.new_full((len(scores),), -math.inf).scatter_reduce_(0, rows, own_scores, reduce="amax")
    return _count_greater(scores, best_own[:, None])


def _caption_ranks(scores: torch.Tensor, caption_images: torch.Tensor) -> torch.Tensor:
    """Ranks of captions from their scores against every image (overwritten) and each caption's own image."""
    own_scores = scores[torch.arange(len(scores), device=scores.device), caption_images]
    return _count_greater(scores, own_scores[:, None])


def _summarise(image_ranks: torch.Tensor, caption_ranks: torch.Tensor) -> dict[str, float]:
    """The original's keys (txt_* = image->text, img_* = text->image), then 1-based mean and median ranks."""
    result: dict[str, float] = {}
    rank_stats: dict[str, float] = {}
    for prefix, ranks in (("txt", image_ranks.cpu().numpy()), ("img", caption_ranks.cpu().numpy())):
        # Same operations in the same order as the original, so the floats match it bit for bit.
        recalls = [100.0 * int(np.count_nonzero(ranks < k)) / len(ranks) for k in RECALL_KS]
        result.update({f"{prefix}_r{k}": recall for k, recall in zip(RECALL_KS, recalls)})
        result[f"{prefix}_r_mean"] = (recalls[0] + recalls[1] + recalls[2]) / 3
        rank_stats[f"{prefix}_mean_rank"] = float(ranks.mean()) + 1
        rank_stats[f"{prefix}_median_rank"] = float(np.median(ranks)) + 1
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result | rank_stats


def _as_scores(scores: Scores, name: str, shape: tuple[int, int]) -> torch.Tensor:
    scores = torch.as_tensor(scores)
    if scores.shape != shape:
        raise ValueError(f"{name} has shape {tuple(scores.shape)}, expected {shape}")
    if not scores.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {scores.dtype}")
    if torch.isnan(scores).any():
        raise ValueError(f"{name} contains NaN, which compares as neither higher nor lower")
    return scores


def _copied_blocks(scores: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, copy of the next rows), reusing one buffer: each block must be used up before the next."""
    rows = max(1, _ITM_EVAL_BLOCK_ELEMENTS // scores.shape[1])
    # float16/bfloat16 widen exactly (order and ties survive) to a dtype whose 0/1 sums count exactly.
    dtype = torch.promote_types(scores.dtype, torch.float32)
    buffer = torch.empty(min(rows, len(scores)), scores.shape[1], dtype=dtype, device=scores.device)
    for start in range(0, len(scores), rows):
        source = scores[start:start + rows]
        yield start, buffer[:len(source)].copy_(source)


def itm_eval(scores_i2t: Scores, scores_t2i: Scores, txt2img: Indices, img2txt: CaptionLists) -> dict[str, float]:
    """Recall@1/5/10 of image->text (txt_*) and text->image (img_*) retrieval from full score matrices.

    scores_i2t is (n_images, n_captions), scores_t2i is (n_captions, n_images), numpy or torch, on any
    device; txt2img[c] is caption c's image and img2txt[i] lists image i's captions (lists, arrays, tensors, or
    the original's dicts {caption_id: image_id} and {image_id: [caption_ids]}). Returns the original's
    keys (percentages) plus 1-based mean and median ranks; see the module docstring for how ties rank.
    """
    scores_i2t = torch.as_tensor(scores_i2t)
    if scores_i2t.ndim != 2:
        raise ValueError(f"scores_i2t must be 2-D, got shape {tuple(scores_i2t.shape)}")
    n_images, n_captions = scores_i2t.shape
    if n_images == 0 or n_captions == 0:
        raise ValueError("need at least one image and one caption")
    scores_i2t = _as_scores(scores_i2t, "scores_i2t", (n_images, n_captions))
    scores_t2i = _as_scores(scores_t2i, "scores_t2i", (n_captions, n_images))
    pairs = _caption_pairs(img2txt, n_images, n_captions, scores_i2t.device)
    caption_images = _caption_images(txt2img, n_captions, n_images, scores_t2i.device)

    image_ranks = torch.cat([_image_ranks(block, pairs, start) for start, block in _copied_blocks(scores_i2t)])
    caption_ranks = torch.cat([_caption_ranks(block, caption_images[start:start + len(block)])
                               for start, block in _copied_blocks(scores_t2i)])
    return _summarise(image_ranks, caption_ranks)


def _as_features(features: Scores, name: str, device: torch.device) -> torch.Tensor:
    features = torch.as_tensor(features)
    if features.ndim != 2 or not features.is_floating_point():
        raise ValueError(f"{name} must be a 2-D float array, got shape {tuple(features.shape)} {features.dtype}")
    features = features.to(device=device, dtype=torch.float32)
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return features


def _score_blocks(queries: torch.Tensor, candidates: torch.Tensor,
                  chunk_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first query, scores of the next queries against every candidate), reusing one buffer: each block
    must be used up before the next. Fresh pages cost more to fault in than the comparisons that fill them."""
    buffer = torch.empty(min(chunk_size, len(queries)), len(candidates), device=queries.device)
    for start in range(0, len(queries), chunk_size):
        chunk = queries[start:start + chunk_size]
        yield start, torch.mm(chunk, candidates.T, out=buffer[:len(chunk)])


@torch.no_grad()
def retrieval_metrics(image_features: Scores, text_features: Scores, txt2img: Indices, img2txt: CaptionLists,
                      chunk_size: int = 1024,
                      device: torch.device | str | None = None) -> dict[str, float]:
    """itm_eval's metrics with scores = image_features @ text_features.T, never holding the full matrix.

    Features are expected L2-normalised (they are used as given), any float dtype, computed in float32 on
    `device` (default: image_features' device). Scores are made chunk_size queries at a time into one
    buffer of chunk_size x max(n_images, n_captions) float32s: 635 MB at the default for Flickr30k's
    155,070 captions.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if device is None:
        device = image_features.device if isinstance(image_features, torch.Tensor) else torch.device("cpu")
    image_features = _as_features(image_features, "image_features", torch.device(device))
    text_features = _as_features(text_features, "text_features", torch.device(device))
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"feature widths differ: {image_features.shape[1]} (image) vs {text_features.shape[1]} (text)")
    n_images, n_captions = len(image_features), len(text_features)
    if n_images == 0 or n_captions == 0:
        raise ValueError("need at least one image and one caption")
    pairs = _caption_pairs(img2txt, n_images, n_captions, image_features.device)
    caption_images = _caption_images(txt2img, n_captions, n_images, image_features.device)

    # Both directions see the same scores but each makes its own matmul pass: a query's threshold must come
    # from the very block it is compared against, as a separately computed copy of it can differ in the
    # last bit and break ties differently from itm_eval.
    image_ranks = torch.cat([_image_ranks(block, pairs, start)
                             for start, block in _score_blocks(image_features, text_features, chunk_size)])
    caption_ranks = torch.cat([_caption_ranks(block, caption_images[start:start + len(block)])
                               for start, block in _score_blocks(text_features, image_features, chunk_size)])
    return _summarise(image_ranks, caption_ranks)
