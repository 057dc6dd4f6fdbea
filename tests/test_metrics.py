"""Recall@K and rank statistics: hand-built rankings, the original's loop definition, chunking, ties, inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from utils import metrics
from utils.metrics import itm_eval, retrieval_metrics

CORE_KEYS = ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean")


def _loop_reference(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img, img2txt) -> dict[str, float]:
    """The original repo's definition, one query at a time: rank = position in the descending argsort."""
    image_ranks = []
    for image, row in enumerate(scores_i2t):
        order = list(np.argsort(row)[::-1])
        image_ranks.append(min(order.index(caption) for caption in img2txt[image]))
    caption_ranks = []
    for caption, row in enumerate(scores_t2i):
        order = list(np.argsort(row)[::-1])
        caption_ranks.append(order.index(txt2img[caption]))

    result = {}
    for prefix, ranks in (("txt", image_ranks), ("img", caption_ranks)):
        recalls = [100.0 * sum(rank < k for rank in ranks) / len(ranks) for k in (1, 5, 10)]
        result |= {f"{prefix}_r1": recalls[0], f"{prefix}_r5": recalls[1], f"{prefix}_r10": recalls[2],
                   f"{prefix}_r_mean": (recalls[0] + recalls[1] + recalls[2]) / 3}
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


def _captions_per_image(counts: list[int]) -> tuple[list[int], list[list[int]]]:
    """Consecutive caption indices for images with the given caption counts, as (txt2img, img2txt)."""
    img2txt, start = [], 0
    for count in counts:
        img2txt.append(list(range(start, start + count)))
        start += count
    txt2img = [image for image, captions in enumerate(img2txt) for _ in captions]
    return txt2img, img2txt


def _scores_from_orders(orders: list[list[int]], n_candidates: int) -> np.ndarray:
    """One row per query: the listed candidates score highest, in that order; the rest follow by index."""
    scores = np.empty((len(orders), n_candidates))
    for row, first in enumerate(orders):
        order = first + [c for c in range(n_candidates) if c not in first]
        scores[row, order] = np.arange(n_candidates, 0, -1)
    return scores


def _dyadic_features(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Unit vectors of +-1/4 entries (dim 16): every dot product is exact, so ties are exact and frequent."""
    assert dim == 16
    return (torch.randint(0, 2, (n, dim), generator=generator) * 0.5 - 0.25).float()


def _random_dataset(seed: int, n_images: int, max_captions: int = 7):
    rng = np.random.default_rng(seed)
    txt2img, img2txt = _captions_per_image(list(rng.integers(1, max_captions + 1, n_images)))
    # Shuffle caption indices so that an image's captions are not neighbours.
    permutation = rng.permutation(len(txt2img))
    txt2img = [txt2img[old] for old in np.argsort(permutation)]
    img2txt = [[int(permutation[c]) for c in captions] for captions in img2txt]
    return rng, txt2img, img2txt


def test_hand_built_ranks_give_hand_computed_recalls():
    # Image i owns i + 1 captions (1 to 7): image 0 owns [0], image 1 owns [1, 2], image 2 owns [3, 4, 5], ...
    txt2img, img2txt = _captions_per_image([1, 2, 3, 4, 5, 6, 7])
    i2t_orders = [
        [0],                                   # rank 0
        [0, 3, 2],                             # rank 2: caption 2 after two foreign captions
        [0, 1, 2, 6, 7, 5],                    # rank 5: first miss of R@5
        [0, 1, 2, 3, 4, 5, 10, 11, 12, 9],     # rank 9: last hit of R@10
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12],    # rank 10: first miss of R@10
        [20],                                  # rank 0 through its last caption
        [0, 1, 2, 3, 27],                      # rank 4: last hit of R@5
    ]
    # Caption ranks among the 7 images: ten at 0, four at 1, three at 4, four at 5, seven at 6.
    caption_ranks = [0, 6, 1, 0, 5, 6, 4, 0, 0, 6, 1, 5, 0, 6, 4, 0, 6, 1, 0, 5, 6, 0, 4, 5, 0, 6, 1, 0]
    t2i_orders = []
    for caption, rank in enumerate(caption_ranks):
        foreign = [image for image in range(7) if image != txt2img[caption]]
        t2i_orders.append(foreign[:rank] + [txt2img[caption]])
    scores_i2t = _scores_from_orders(i2t_orders, 28)
    scores_t2i = _scores_from_orders(t2i_orders, 7)
    assert sorted(caption_ranks) == [0] * 10 + [1] * 4 + [4] * 3 + [5] * 4 + [6] * 7

    result = itm_eval(scores_i2t, scores_t2i, txt2img, img2txt)

    # Image ranks 0, 2, 5, 9, 10, 0, 4.
    assert result["txt_r1"] == 100.0 * 2 / 7
    assert result["txt_r5"] == 100.0 * 4 / 7
    assert result["txt_r10"] == 100.0 * 6 / 7
    assert result["txt_mean_rank"] == pytest.approx((1 + 3 + 6 + 10 + 11 + 1 + 5) / 7)
    assert result["txt_median_rank"] == 5
    assert result["img_r1"] == 100.0 * 10 / 28
    assert result["img_r5"] == 100.0 * 17 / 28
    assert result["img_r10"] == 100.0
    assert result["img_median_rank"] == 3.5  # the 14th and 15th of 28 1-based ranks are 2 and 5
    assert result["txt_r_mean"] == pytest.approx(100.0 * 12 / 21)
    assert result["r_mean"] == pytest.approx((result["txt_r_mean"] + result["img_r_mean"]) / 2)
    assert {key: result[key] for key in CORE_KEYS} == _loop_reference(scores_i2t, scores_t2i, txt2img, img2txt)


def test_itm_eval_blocks_do_not_change_results(monkeypatch):
    rng, txt2img, img2txt = _random_dataset(7, n_images=23)
    scores_i2t = rng.standard_normal((23, len(txt2img))).astype(np.float32)
    scores_t2i = rng.standard_normal((len(txt2img), 23)).astype(np.float32)
    expected = itm_eval(scores_i2t, scores_t2i, txt2img, img2txt)
    for block_elements in (1, 7 * len(txt2img), 5 * len(txt2img) + 3):  # one row; 7 rows; a ragged last block
        monkeypatch.setattr(metrics, "_ITM_EVAL_BLOCK_ELEMENTS", block_elements)
        assert itm_eval(scores_i2t, scores_t2i, txt2img, img2txt) == expected


def test_ties_count_only_strictly_higher_scores():
    scores_i2t = np.array([[0.9, 0.9, 0.1],    # image 0 owns caption 0, tied with caption 1: rank 0
                           [0.5, 0.2, 0.5]])   # image 1 owns 1 and 2; caption 2 ties caption 0: rank 0
    scores_t2i = np.array([[0.7, 0.7],         # caption 0 (image 0) ties image 1: rank 0
                           [0.8, 0.3],         # caption 1 (image 1) is beaten by image 0: rank 1
                           [0.4, 0.4]])        # caption 2 (image 1) ties: rank 0
    result = itm_eval(scores_i2t, scores_t2i, [0, 1, 1], [[0], [1, 2]])
    assert (result["txt_r1"], result["img_r1"], result["img_r5"]) == (100.0, 100.0 * 2 / 3, 100.0)
    assert result["img_mean_rank"] == pytest.approx(4 / 3)


@pytest.mark.parametrize("seed", range(3))
def test_itm_eval_matches_loop_reference_on_random_scores(seed):
    rng, txt2img, img2txt = _random_dataset(seed, n_images=40)
    scores_i2t = rng.standard_normal((40, len(txt2img)))
    scores_t2i = rng.standard_normal((len(txt2img), 40))
    result = itm_eval(scores_i2t, scores_t2i, txt2img, img2txt)
    assert {key: result[key] for key in CORE_KEYS} == _loop_reference(scores_i2t, scores_t2i, txt2img, img2txt)
    assert list(result)[:len(CORE_KEYS)] == list(CORE_KEYS)


@pytest.mark.parametrize("seed", range(3))
def test_retrieval_metrics_matches_itm_eval_and_loop_reference(seed):
    rng, txt2img, img2txt = _random_dataset(seed, n_images=50)
    generator = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(50, 32, generator=generator), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(len(txt2img), 32, generator=generator), dim=1)
    scores = (images @ texts.T).numpy()

    result = retrieval_metrics(images, texts, txt2img, img2txt, chunk_size=16)
    assert result == itm_eval(scores, scores.T, txt2img, img2txt)
    assert {key: result[key] for key in CORE_KEYS} == _loop_reference(scores, scores.T, txt2img, img2txt)


def test_chunk_size_and_ties_give_identical_results():
    _, txt2img, img2txt = _random_dataset(3, n_images=30)
    generator = torch.Generator().manual_seed(3)
    images = _dyadic_features(30, 16, generator)
    texts = _dyadic_features(len(txt2img), 16, generator)
    scores = images @ texts.T
    assert len(scores.unique()) < 20  # heavily tied, exactly

    expected = itm_eval(scores, scores.T, txt2img, img2txt)
    for chunk_size in (1, 7, 10_000):
        assert retrieval_metrics(images, texts, txt2img, img2txt, chunk_size=chunk_size) == expected


def test_tied_ranks_match_a_strict_count():
    _, txt2img, img2txt = _random_dataset(4, n_images=12)
    generator = torch.Generator().manual_seed(4)
    scores = (_dyadic_features(12, 16, generator) @ _dyadic_features(len(txt2img), 16, generator).T).numpy()
    image_ranks = [min(int((row > row[c]).sum()) for c in captions) for row, captions in zip(scores, img2txt)]
    caption_ranks = [int((scores[:, c] > scores[image, c]).sum()) for c, image in enumerate(txt2img)]
    result = itm_eval(scores, scores.T, txt2img, img2txt)
    assert result["txt_mean_rank"] == pytest.approx(np.mean(image_ranks) + 1)
    assert result["img_median_rank"] == np.median(caption_ranks) + 1
    assert result["txt_r5"] == 100.0 * sum(rank < 5 for rank in image_ranks) / 12


def test_numpy_torch_and_low_precision_inputs_agree():
    txt2img, img2txt = _captions_per_image([5] * 20)
    generator = torch.Generator().manual_seed(5)
    images = _dyadic_features(20, 16, generator)
    texts = _dyadic_features(100, 16, generator)
    scores = images @ texts.T
    expected = itm_eval(scores.numpy(), scores.T.numpy(), txt2img, img2txt)

    assert itm_eval(scores, scores.T, torch.tensor(txt2img), np.array(img2txt)) == expected
    assert itm_eval(scores.half(), scores.T.double(), np.array(txt2img, dtype=np.int32),
                    torch.tensor(img2txt)) == expected
    assert retrieval_metrics(images.numpy(), texts.numpy(), txt2img, img2txt) == expected
    # +-1/4 is exact in every float dtype, so computing in float32 must give the same numbers.
    assert retrieval_metrics(images.half(), texts.bfloat16(), txt2img, img2txt) == expected
    assert all(type(value) is float for value in expected.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    _, txt2img, img2txt = _random_dataset(6, n_images=64)
    generator = torch.Generator().manual_seed(6)
    images = _dyadic_features(64, 16, generator)
    texts = _dyadic_features(len(txt2img), 16, generator)
    expected = retrieval_metrics(images, texts, txt2img, img2txt, chunk_size=7)
    assert retrieval_metrics(images, texts, txt2img, img2txt, chunk_size=7, device="cuda") == expected
    assert retrieval_metrics(images.cuda(), texts.cuda(), txt2img, img2txt) == expected
    scores = (images @ texts.T).cuda()
    assert itm_eval(scores, scores.T, torch.tensor(txt2img).cuda(), img2txt) == expected


def _original_dataset_indices(annotations: list[dict]) -> tuple[dict, dict]:
    """txt2img and img2txt built as the original's ClipDataset builds them: dicts filled in one pass over
    the annotation list, caption ids counted across images."""
    txt2img, img2txt = {}, {}
    txt_id = 0
    for img_id, ann in enumerate(annotations):
        img2txt[img_id] = []
        for _caption in ann["caption"]:
            img2txt[img_id].append(txt_id)
            txt2img[txt_id] = img_id
            txt_id += 1
    return txt2img, img2txt


@pytest.mark.parametrize("seed", range(3))
def test_the_originals_dict_indices_give_the_same_metrics_as_lists(seed):
    rng = np.random.default_rng(seed)
    annotations = [{"image": f"{i}.jpg", "caption": [f"c{i}.{k}" for k in range(rng.integers(1, 6))]}
                   for i in range(40)]
    txt2img, img2txt = _original_dataset_indices(annotations)
    assert isinstance(txt2img, dict) and isinstance(img2txt, dict)
    scores = rng.normal(size=(len(img2txt), len(txt2img)))
    expected = _loop_reference(scores, scores.T, txt2img, img2txt)
    as_lists = itm_eval(scores, scores.T, [txt2img[c] for c in range(len(txt2img))],
                        [img2txt[i] for i in range(len(img2txt))])
    from_dicts = itm_eval(scores, scores.T, txt2img, img2txt)
    assert from_dicts == as_lists and {k: from_dicts[k] for k in CORE_KEYS} == expected
    # Keys as a JSON round trip leaves them, arrays, tensors and dicts built in another order agree too.
    import json
    assert itm_eval(scores, scores.T, json.loads(json.dumps(txt2img)), json.loads(json.dumps(img2txt))) == as_lists
    reversed_img2txt = {i: np.array(img2txt[i]) for i in reversed(range(len(img2txt)))}
    assert itm_eval(torch.tensor(scores), torch.tensor(scores.T), torch.tensor(list(txt2img.values())),
                    reversed_img2txt) == as_lists
    features = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(len(img2txt) + len(txt2img), 8))),
                                             dim=1)
    images, texts = features[:len(img2txt)], features[len(img2txt):]
    assert retrieval_metrics(images, texts, txt2img, img2txt) == \
        retrieval_metrics(images, texts, list(txt2img.values()), list(img2txt.values()))


def test_an_image_with_one_caption_may_list_it_bare():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.7]])
    assert itm_eval(scores, scores.T, {0: 0, 1: 1, 2: 1}, {0: 0, 1: [1, 2]}) == \
        itm_eval(scores, scores.T, [0, 1, 1], [[0], [1, 2]])


_SCORES = np.zeros((2, 3))
_GOOD = dict(scores_i2t=_SCORES, scores_t2i=_SCORES.T, txt2img=[0, 1, 1], img2txt=[[0], [1, 2]])


@pytest.mark.parametrize("override, message", [
    (dict(scores_i2t=np.zeros(6)), "must be 2-D"),
    (dict(scores_i2t=np.zeros((0, 3)), scores_t2i=np.zeros((3, 0))), "at least one image"),
    (dict(scores_t2i=_SCORES), "scores_t2i has shape"),
    (dict(scores_i2t=np.zeros((2, 3), dtype=np.int64)), "floating point"),
    (dict(scores_t2i=np.full((3, 2), np.nan)), "NaN"),
    (dict(txt2img=[0, 1]), "txt2img has shape"),
    (dict(txt2img=[0, 1, 2]), r"outside \[0, 2\)"),
    (dict(txt2img=[0.0, 1.0, 1.0]), "integer image indices"),
    (dict(img2txt=[[0, 1, 2]]), "2 images"),
    (dict(img2txt=[[0, 1, 2], []]), "image 1 has no captions"),
    (dict(img2txt=[[0], [1, 3]]), r"outside \[0, 3\)"),
    (dict(img2txt=[[0.0], [1.0, 2.0]]), "integer caption indices"),
    (dict(txt2img={0: 0, 2: 1, 3: 1}), "id 1 is missing"),
    (dict(img2txt={0: [0], 1: [1], 2: [2]}), r"ids outside \[0, 2\) are present"),
    (dict(img2txt={"a": [0], "b": [1, 2]}), "keys must be integer ids"),
])
def test_itm_eval_rejects_bad_inputs(override, message):
    with pytest.raises(ValueError, match=message):
        itm_eval(**(_GOOD | override))


@pytest.mark.parametrize("override, message", [
    (dict(chunk_size=0), "chunk_size must be positive"),
    (dict(image_features=np.zeros((2, 4))), "feature widths differ"),
    (dict(text_features=np.zeros(3)), "2-D float"),
    (dict(text_features=np.zeros((3, 3), dtype=np.int64)), "2-D float"),
    (dict(image_features=np.full((2, 3), np.inf)), "NaN or infinite"),
    (dict(text_features=np.zeros((0, 3))), "at least one image"),
    (dict(txt2img=[0, 1, 5]), "outside"),
])
def test_retrieval_metrics_rejects_bad_inputs(override, message):
    arguments = dict(image_features=np.eye(2, 3), text_features=np.eye(3), txt2img=[0, 1, 1], img2txt=[[0], [1, 2]])
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(**(arguments | override))
