"""mode="index": a FAISS index over an embeddings folder, sized to a memory budget, and the searches answered from it.

On disk an index is a folder: `index.json` (which embeddings folder and parts it covers, the FAISS index_factory
key, the search setting tuned at build time, rows removed since, the build report) and, for the approximate kinds,
`knn.index` (FAISS's own format). An exact `Flat` index keeps no file of its own: its vectors are the embeddings
parts (utils/predict/embeddings.py), read back in seconds. Ids are row numbers in the embeddings folder, parts in
name order, so an id is also its metadata row. Parts added to the embeddings folder after the build are added when
the index is opened; a folder search (utils/predict/search.py) is this format with the embeddings inside the index
folder, grown by one part per update.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from utils.files import atomic_write_bytes, human_size
from utils.errors import UserError
from utils.predict.embeddings import Embeddings, embeddings_fix, part_names, part_paths

if TYPE_CHECKING:
    from nets.configs import TextConfig

MANIFEST = "index.json"
INDEX_FILE = "knn.index"
VERSION = 2  # 1 lacked the row counts the opener checks
FORMAT = f"clip-index/{VERSION}"
# Exact search while the vectors take at most half the budget and number at most this many: a query then scans
# 100,000 x 512 floats (about 20 ms on 2 cores); above it an IVF answers in a few ms at recall@10 >= 0.95.
FLAT_MAX = 100_000
# The search setting (nprobe, efSearch) is the smallest whose recall@10 on held-out vectors reaches this.
TARGET_RECALL = 0.95
# Product-quantiser sizes tried, most precise first (bytes per vector; each must divide the dimension).
PQ_SIZES = (256, 128, 64, 48, 32, 24, 16, 8, 4)
# index_type's names (any case) for the kinds choose_key sizes; anything else is a FAISS index_factory string.
KINDS = {"auto": "auto", "flat": "Flat", "ivf": "IVF", "hnsw": "HNSW", "pq": "IVFPQ", "ivfpq": "IVFPQ"}
CHUNK = 65536  # rows per matrix product of exact search: 128 MiB of float32 at 512-d


def parse_memory(text: str | int) -> int:
    """Bytes in "4G", "500M", "1.5GB", "2GiB", "800k" or a plain number (powers of 1024, as autofaiss reads them)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not match:
        raise UserError(f"index_memory {text!r} is not a size such as \"4G\", \"500M\" or \"2GiB\"")
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " "))


def n_lists(n: int) -> int:
    """IVF lists: a power of two near 4 sqrt(n), FAISS's guideline (4 to 16 sqrt(n)) as autofaiss takes it, and at
    most n / 39 (k-means wants 39 points per centroid). Measured at 1M x 512-d from 10,000 clusters: 1,024 lists
    needed nprobe=128 (15.5 ms a query) for recall@10 0.95, 4,096 lists reached 0.99 at nprobe=1 (0.16 ms); the
    price is k-means over 4x the centroids (121 s against 33 s to build on 2 cores)."""
    return int(max(1, min(2 ** round(math.log2(max(1.0, 4 * math.sqrt(n)))), n // 39 or 1)))


def index_bytes(key: str, n: int, d: int) -> int:
    """Estimated memory of index `key` holding n vectors of dimension d (ids are 8 bytes each)."""
    ivf = re.match(r"IVF(\d+)", key)
    coarse = int(ivf.group(1)) * d * 4 if ivf else 0
    if (pq := re.search(r"PQ(\d+)", key)):
        m = int(pq.group(1))
        return n * (m + 8) + coarse + 256 * d * 4
    if (hnsw := re.match(r"HNSW(\d+)", key)):
        return n * (4 * d + 8 * int(hnsw.group(1)) + 8)
    return n * (4 * d + 8) + coarse


def choose_key(n: int, d: int, memory: int, kind: str = "auto") -> str:
    """The FAISS index_factory key for n vectors of dimension d within `memory` bytes, or the kind asked for
    (`flat`, `ivf`, `hnsw`, `pq`, any case, sized here; anything else is taken as a FAISS index_factory string).

    After autofaiss's rule (exact for few vectors, HNSW where its links fit, IVF while full vectors fit,
    else IVF with product quantisation as fine as the budget allows), except that HNSW is not chosen on its own:
    its build inserts ~400 vectors/s per CPU core at 512-d (measured here), most of an hour for a million, where an
    IVF builds in two minutes and answers as fast. `kind` "hnsw" asks for it anyway."""
    kind = KINDS.get(kind.lower(), kind)
    if kind not in KINDS.values():
        return kind  # a FAISS index_factory string, taken as it is
    nlist = n_lists(n)
    coarse = f"IVF{nlist}" + ("_HNSW32" if nlist >= 16384 else "")
    keys = {"Flat": "Flat", "HNSW": "HNSW32", "IVF": f"{coarse},Flat"}
    if kind in keys:
        return keys[kind]
    fitting = [m for m in PQ_SIZES if m < d and d % m == 0 and index_bytes(f"{coarse},PQ{m}", n, d) <= memory]
    if kind == "IVFPQ":
        return f"{coarse},PQ{fitting[0] if fitting else min(m for m in PQ_SIZES if d % m == 0)}"
    if n <= FLAT_MAX and index_bytes("Flat", n, d) <= memory / 2:
        return "Flat"
    if index_bytes(keys["IVF"], n, d) <= memory:
        return keys["IVF"]
    if fitting:
        return f"{coarse},PQ{fitting[0]}"
    smallest = index_bytes(f"{coarse},PQ4", n, d)
    raise UserError(f"index_memory {human_size(memory)} cannot hold {n:,} vectors: the smallest index (PQ4) needs "
                    f"{human_size(smallest)}; raise index_memory")


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise UserError("the index needs FAISS: pip install faiss-cpu (or faiss-gpu)") from e
    return faiss


class ExactIndex:
    """Exact inner-product search behind FAISS's calls (add_with_ids, search, ntotal), by chunked torch matrix
    products: FAISS's Flat scans a single query on one thread, torch on every core (65 against 175 ms a query over
    100,000 x 512 on 2 cores, measured side by side)."""
    is_trained = True

    def __init__(self, d: int):
        self.d = d
        self._blocks: list[tuple[np.ndarray, np.ndarray]] = []

    @property
    def ntotal(self) -> int:
        return sum(len(ids) for _, ids in self._blocks)

    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        for s in range(0, len(ids), CHUNK):
            self._blocks.append((np.ascontiguousarray(vectors[s:s + CHUNK], dtype=np.float32),
                                 np.asarray(ids[s:s + CHUNK], dtype=np.int64)))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = top_rows(queries, self._blocks, k)
        pad = k - ids.shape[1]  # fewer rows than k: FAISS's -1 ids
        return (np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf),
                np.pad(ids, ((0, 0), (0, pad)), constant_values=-1))


def top_rows(queries: np.ndarray, blocks, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the k rows with the largest inner product with each query, best first, over `blocks` of
    (float32 rows, their ids), by brute force."""
    import torch

    q = torch.from_numpy(np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32))
    best_scores = torch.full((len(q), 0), -float("inf"))
    best_ids = torch.zeros((len(q), 0), dtype=torch.long)
    with torch.inference_mode():
        for vectors, ids in blocks:
            scores = q @ torch.from_numpy(vectors).T
            top = scores.topk(min(k, scores.shape[1]), dim=1)
            best_scores = torch.cat([best_scores, top.values], dim=1)
            best_ids = torch.cat([best_ids, torch.from_numpy(ids)[top.indices]], dim=1)
            keep = best_scores.topk(min(k, best_scores.shape[1]), dim=1).indices
            best_scores, best_ids = best_scores.gather(1, keep), best_ids.gather(1, keep)
        order = best_scores.argsort(dim=1, descending=True)
        return best_scores.gather(1, order).numpy(), best_ids.gather(1, order).numpy()


def new_index(key: str, d: int):
    if key == "Flat":
        return ExactIndex(d)
    faiss = _faiss()
    try:
        index = faiss.index_factory(d, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:  # FAISS's message is a C++ location and "could not parse"
        raise UserError(f"index_type {key!r} is neither auto, flat, ivf, hnsw, pq nor a FAISS index_factory string "
                        "this FAISS builds (such as \"IVF4096,PQ64\" or \"HNSW32\")") from e
    # Ids are embeddings rows, which skip repeated images: IVF keeps ids itself, the others need the map.
    return index if "IVF" in key else faiss.IndexIDMap(index)


def search_params(index) -> tuple[str, list[int]]:
    """The knob that trades speed for recall on this index, and the values worth trying."""
    if isinstance(index, ExactIndex):
        return "", []
    faiss = _faiss()
    if isinstance(index, faiss.IndexIDMap) and isinstance(faiss.downcast_index(index.index), faiss.IndexHNSW):
        return "efSearch", [16, 32, 64, 128, 256, 512]
    try:
        nlist = faiss.extract_index_ivf(index).nlist
    except RuntimeError:  # neither IVF nor HNSW: exact
        return "", []
    return "nprobe", [p for p in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512) if p <= nlist]


def set_param(index, name: str, value: int) -> None:
    faiss = _faiss()
    if name == "nprobe":
        faiss.extract_index_ivf(index).nprobe = value
    elif name == "efSearch":
        faiss.downcast_index(index.index).hnsw.efSearch = value


def exact_top(emb: Embeddings, queries: np.ndarray, k: int, kept: list[np.ndarray] | None = None) -> np.ndarray:
    """Ids of the k rows (of `kept`, each part's local rows; default all) with the largest inner product with each
    query, by brute force."""
    def blocks():
        for part, start in enumerate(emb.starts):
            vectors = emb.vectors(part)
            rows = np.arange(len(vectors)) if kept is None else kept[part]
            for s in range(0, len(rows), CHUNK):
                block = rows[s:s + CHUNK]
                yield np.asarray(vectors[block], dtype=np.float32), block + start

    return top_rows(queries, blocks(), k)[1]


def recall_at(found: np.ndarray, exact: np.ndarray, query_ids: np.ndarray, k: int = 10) -> float:
    """Mean share of each query's exact k nearest others (itself left out) that `found` lists among its k."""
    hits = wanted = 0
    for row, query in enumerate(query_ids):
        truth = [i for i in exact[row] if i != query][:k]
        got = [i for i in found[row] if i != query and i >= 0][:k]
        hits += len(set(truth) & set(got))
        wanted += len(truth)  # fewer than k when the index holds fewer than k others
    return hits / max(1, wanted)


def build(emb: Embeddings, key: str, queries: int = 1000, seed: int = 0, progress=print,
          text_queries: np.ndarray | None = None) -> tuple[object, dict]:
    """Build index `key` over `emb`'s kept rows; tune its search setting on `queries` held-out rows (not used
    to train it) and on `text_queries` (unit caption or prompt vectors, when given) against exact search.
    Returns (index, report)."""
    faiss = _faiss()
    started = time.perf_counter()
    local = [emb.kept(part) for part in range(len(emb.names))]
    ids = np.concatenate([rows + start for rows, start in zip(local, emb.starts)])
    rng = np.random.default_rng(seed)
    held_out = np.sort(rng.choice(ids, size=min(queries, len(ids)), replace=False))
    index = new_index(key, emb.dim)
    if not index.is_trained:
        ivf = faiss.extract_index_ivf(index)
        # 39 to 64 points per list, FAISS's range for k-means; the held-out rows stay out of training.
        pool = np.setdiff1d(ids, held_out) if len(ids) > len(held_out) else ids
        size = min(len(pool), 64 * ivf.nlist)
        if len(pool) < ivf.nlist:
            raise UserError(f"{key} needs at least {ivf.nlist} vectors to train; {emb.root} holds {len(pool)}")
        sample = np.sort(rng.choice(pool, size=size, replace=False))
        progress(f"training {key} on {size:,} vectors")
        index.train(emb.rows_at(sample))
    for part, rows in enumerate(local):
        vectors = emb.vectors(part)
        for s in range(0, len(rows), 100_000):
            chunk = rows[s:s + 100_000]
            index.add_with_ids(np.asarray(vectors[chunk], dtype=np.float32), chunk + emb.starts[part])
        progress(f"added part {emb.names[part]} ({index.ntotal:,} vectors)")
    build_seconds = time.perf_counter() - started
    report = {"key": key, "vectors": int(index.ntotal), "dim": emb.dim, "build_seconds": round(build_seconds, 2),
              "memory_bytes": memory_of(index)}
    kinds = {"image": (emb.rows_at(held_out), held_out)}
    if text_queries is not None and len(text_queries):
        kinds["text"] = (np.ascontiguousarray(text_queries, dtype=np.float32), np.full(len(text_queries), -1))
    progress(f"built in {build_seconds:.1f} s; tuning on " + " and ".join(f"{len(q)} {kind} queries"
                                                                       for kind, (q, _) in kinds.items()))
    report.update(tune(index, emb, kinds, local))
    return index, report


def tune(index, emb: Embeddings, kinds: dict[str, tuple[np.ndarray, np.ndarray]],
         kept: list[np.ndarray] | None = None, k: int = 10) -> dict:
    """Set the index's speed/recall knob to the smallest value at which every kind of query reaches TARGET_RECALL.
    `kinds`: name -> (unit query vectors, the row each is, or -1: a row is not its own neighbour)."""
    exact = {kind: exact_top(emb, queries, k + 1, kept) for kind, (queries, _) in kinds.items()}
    name, values = search_params(index)
    chosen, recalls = None, {}
    for value in values or [None]:
        if name:
            set_param(index, name, value)
        chosen = value
        recalls = {kind: recall_at(index.search(queries, k + 1)[1], exact[kind], ids, k)
                   for kind, (queries, ids) in kinds.items()}
        if min(recalls.values()) >= TARGET_RECALL:
            break
    return {"params": {name: chosen} if name else {}, "recall_at_10": {kind: round(r, 4) for kind, r in recalls.items()},
            "queries": {kind: len(queries) for kind, (queries, _) in kinds.items()}}


# Text queries for embeddings without captions: the zero-shot templates over these names (COCO's 80 classes and
# other everyday subjects of photos), so that the index is tuned for what users type as well as for images; by the
# language of the templates the text tower reads (utils/prompts.load_templates: "cn" for the Chinese BERT towers),
# the lists row for row the same names.
OBJECT_NAMES = {"en": (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush", "beach", "mountain", "forest", "river", "lake", "city street", "building",
    "bridge", "sunset", "snow", "flower", "tree", "garden", "kitchen", "bedroom", "office", "restaurant", "child",
    "baby", "woman", "man", "crowd", "face", "hand", "shoe", "shirt", "dress", "hat", "glasses", "painting",
    "drawing", "diagram", "map", "text", "logo", "screenshot", "food", "coffee", "bread", "fish", "insect",
    "butterfly", "rabbit", "monkey", "lion", "tiger", "road", "road sign", "house", "church", "castle", "stadium",
    "guitar", "piano", "computer", "phone", "camera", "watch", "toy", "doll", "lamp", "window", "door", "sky",
    "cloud", "sea", "desert", "field", "farm", "tractor", "helicopter", "rocket", "ship", "sculpture",
), "cn": (
    "人", "自行车", "汽车", "摩托车", "飞机", "公交车", "火车", "卡车", "小船", "红绿灯", "消防栓", "停车标志",
    "停车计时器", "长椅", "鸟", "猫", "狗", "马", "羊", "奶牛", "大象", "熊", "斑马", "长颈鹿", "背包", "雨伞",
    "手提包", "领带", "行李箱", "飞盘", "滑雪板", "单板滑雪板", "球", "风筝", "棒球棒", "棒球手套", "滑板", "冲浪板",
    "网球拍", "瓶子", "酒杯", "杯子", "叉子", "刀", "勺子", "碗", "香蕉", "苹果", "三明治", "橙子", "西兰花",
    "胡萝卜", "热狗", "披萨", "甜甜圈", "蛋糕", "椅子", "沙发", "盆栽", "床", "餐桌", "马桶", "电视", "笔记本电脑",
    "鼠标", "遥控器", "键盘", "手机", "微波炉", "烤箱", "烤面包机", "水槽", "冰箱", "书", "时钟", "花瓶", "剪刀",
    "泰迪熊", "吹风机", "牙刷", "海滩", "山", "森林", "河流", "湖", "城市街道", "建筑", "桥", "日落", "雪", "花",
    "树", "花园", "厨房", "卧室", "办公室", "餐厅", "孩子", "婴儿", "女人", "男人", "人群", "脸", "手", "鞋", "衬衫",
    "连衣裙", "帽子", "眼镜", "油画", "素描", "图表", "地图", "文字", "徽标", "截图", "食物", "咖啡", "面包", "鱼",
    "昆虫", "蝴蝶", "兔子", "猴子", "狮子", "老虎", "道路", "路标", "房子", "教堂", "城堡", "体育场", "吉他", "钢琴",
    "电脑", "电话", "相机", "手表", "玩具", "玩偶", "台灯", "窗户", "门", "天空", "云", "大海", "沙漠", "田野",
    "农场", "拖拉机", "直升机", "火箭", "轮船", "雕塑",
)}


def prompts_for(text: TextConfig, count: int, seed: int = 0) -> list[str]:
    """`count` zero-shot prompts over OBJECT_NAMES in the language of the text tower `text`."""
    from utils.prompts import load_templates

    language = "cn" if text.is_bert else "en"
    return prompt_texts(count, load_templates("", language), OBJECT_NAMES[language], seed)


def prompt_texts(count: int, templates: list[str], names: tuple[str, ...], seed: int = 0) -> list[str]:
    """`count` prompts, each a template over one of `names`, drawn at random without repeats."""
    rng = np.random.default_rng(seed)
    pairs = [(name, template) for template in templates for name in names]
    order = rng.permutation(len(pairs))
    return [pairs[i][1].replace("{c}", pairs[i][0]) for i in order[:count]]


def memory_of(index) -> int:
    """Bytes of the index as FAISS writes it, which is what it holds in memory."""
    if isinstance(index, ExactIndex):
        return index.ntotal * (4 * index.d + 8)
    faiss = _faiss()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "index")
        faiss.write_index(index, path)
        return os.path.getsize(path)


def ms_per_query(index, queries: np.ndarray, batch: int, k: int = 10) -> float:
    started = time.perf_counter()
    for s in range(0, len(queries), batch):
        index.search(queries[s:s + batch], k)
    return (time.perf_counter() - started) * 1000 / len(queries)


def write_manifest(index_dir: Path, manifest: dict) -> None:
    atomic_write_bytes(json.dumps(manifest, indent=1).encode("utf-8"), index_dir / MANIFEST)


def read_manifest(index_dir: str | Path, older: bool = False) -> dict | None:
    """index_dir's index.json, or None when it has none. One that is not this project's index (another program's
    file, another format version; with `older`, an earlier version of ours is returned) is a UserError: nothing
    answers from it, and nothing is written over it."""
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}); if it is this project's index, delete it and build the index "
                        "again, else choose another index_dir") from e
    found = manifest.get("format") if isinstance(manifest, dict) else None
    match = re.fullmatch(r"clip-index/(\d+)", found) if isinstance(found, str) else None
    version = int(match.group(1)) if match else None
    if found == FORMAT or (older and version is not None and version < VERSION):
        return manifest
    if version is not None and version < VERSION:
        raise UserError(f"{path} is an index of format {found}, from an earlier version of this project; "
                        f"{rebuild_command(index_dir, manifest)}")
    if version is not None:
        raise UserError(f"{path} is an index of format {found}, newer than this version reads ({FORMAT}); use the "
                        "version that built it, or choose another index_dir (nothing there was changed)")
    raise UserError(f"{path} is not an index of this project; choose another index_dir (nothing there was changed)")


def rebuild_command(index_dir: str | Path, manifest: dict) -> str:
    """The command that rebuilds the index in index_dir, as a clause for a message."""
    if manifest.get("embeddings_dir") == ".":
        return "rerun the search with --rebuild_index true (it encodes the folder again)"
    source = manifest.get("embeddings_dir") or "EMBEDDINGS_DIR"
    return f"rebuild it with python predict.py --mode index --embeddings_dir {source} --index_dir {index_dir}"


def is_built_index(index_dir: str | Path) -> bool:
    """Whether index_dir holds an index built by mode "index" (answered from as it is), rather than a folder
    search's own index (embeddings kept inside it, "." in the manifest) or nothing."""
    manifest = read_manifest(index_dir, older=True) if index_dir else None  # an earlier one is refused on opening
    return manifest is not None and manifest.get("embeddings_dir") != "."


def refuse_foreign_folder(index_dir: str | Path, what: str) -> None:
    """An index_dir to build into holds no index.json: only a new or empty folder is taken, never a user's files."""
    folder = Path(index_dir)
    if (folder / "embed.json").is_file():  # never take (and delete) what mode "embed" wrote for an index
        raise UserError(f"index_dir {folder} holds embeddings written by mode \"embed\"; index them with "
                        f"--mode index --embeddings_dir {folder} --index_dir <a new folder>, or choose another "
                        "index_dir")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"index_dir {folder} is not empty and holds no index; choose an empty or new folder for "
                        f"{what}")


_FIELDS = {"embeddings_dir": str, "key": str, "dim": int, "parts": dict, "removed": dict, "params": dict}


class VectorIndex:
    """An index folder opened for search, verified first: the manifest's fields, each part's files and row count
    against what the build recorded, and the FAISS index's vector count. Ids are rows in the recorded parts'
    order, then the parts completed since (which join the index here, as appending needs no retraining)."""

    def __init__(self, index_dir: str | Path):
        faiss = _faiss()
        self.dir = Path(index_dir)
        manifest = read_manifest(self.dir)
        if manifest is None:
            raise UserError(f"{self.dir} holds no index; build one with --mode index --embeddings_dir E "
                            f"--index_dir {self.dir}")
        self.manifest = manifest
        fix = rebuild_command(self.dir, manifest)
        for field, kind in _FIELDS.items():
            if not isinstance(manifest.get(field), kind):
                raise UserError(f"{self.dir / MANIFEST} lacks its {field!r} field; {fix}")
        folder_search = manifest["embeddings_dir"] == "."
        source = self.dir if folder_search else Path(manifest["embeddings_dir"])
        recorded = manifest["parts"]
        # A folder search lists every part it wrote; a part there that it does not list is an interrupted update's.
        later = [] if folder_search else [n for n in part_names(source, complete=True) if n not in recorded]
        self.emb = Embeddings.open(source, list(recorded) + later,
                                   fix if folder_search else f"{embeddings_fix(source)}, then {fix}")
        for name, rows in zip(self.emb.names, self.emb.rows):
            if name in recorded and recorded[name] != rows:
                raise UserError(f"{part_paths(source, name)['img_emb']} holds {rows:,} rows where the index recorded "
                                f"{recorded[name]:,} (the embeddings changed after the build); {fix}")
        if self.emb.total and self.emb.dim != manifest["dim"]:
            raise UserError(f"{source} holds vectors of width {self.emb.dim}, the index {manifest['dim']}; {fix}")
        self.key = manifest["key"]
        starts = dict(zip(self.emb.names, self.emb.starts))
        removed = {starts[name] + row for name, rows in manifest["removed"].items() if name in starts for row in rows}
        if self.key == "Flat":
            self.index, covered = new_index("Flat", self.emb.dim or manifest["dim"]), []
        else:
            self.index, covered = self._read_index(faiss, fix), list(recorded)
        for name, value in manifest["params"].items():
            set_param(self.index, name, value)
        for part, name in enumerate(self.emb.names):
            if name not in covered:
                rows = self.emb.kept(part)
                rows = rows[~np.isin(rows + self.emb.starts[part], list(removed))] if removed else rows
                self.index.add_with_ids(np.asarray(self.emb.vectors(part)[rows], dtype=np.float32),
                                        rows + self.emb.starts[part])
        # Rows removed from parts the FAISS file holds are filtered from answers; the others were never added.
        self.removed = {row for row in removed if self._part_name(row) in covered}
        self._paths: list | None = None

    def _read_index(self, faiss, fix: str):
        path = self.dir / INDEX_FILE
        manifest = self.manifest
        expected = manifest.get("index_bytes")
        if not path.is_file() or (expected is not None and path.stat().st_size != expected):
            what = "is missing" if not path.is_file() else f"holds {path.stat().st_size:,} bytes, not {expected:,}"
            raise UserError(f"{path} {what}; {fix}")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise UserError(f"{path} is not a FAISS index FAISS reads; {fix}") from e
        if index.ntotal != manifest.get("vectors") or index.d != manifest["dim"]:
            raise UserError(f"{path} holds {index.ntotal:,} vectors of width {index.d} where the index recorded "
                            f"{manifest.get('vectors')} of width {manifest['dim']}; {fix}")
        return index

    def _part_name(self, row: int) -> str:
        return self.emb.names[int(np.searchsorted(np.array(self.emb.starts), row, side="right")) - 1]

    @property
    def size(self) -> int:
        return int(self.index.ntotal) - len(self.removed)

    def path(self, row: int) -> str:
        if self._paths is None:
            self._paths = [p for part in range(len(self.emb.names)) for p in self.emb.column(part, "image_path")]
        return self._paths[row]

    def search(self, vectors: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """Per query (unit rows), the k best (row, score), best first; removed rows never appear."""
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        scores, ids = self.index.search(vectors, k + len(self.removed))
        return [[(int(i), float(s)) for s, i in zip(row_scores, row_ids) if i >= 0 and int(i) not in self.removed][:k]
                for row_scores, row_ids in zip(scores, ids)]

    def query(self, vector, k: int = 10) -> list[tuple[str, float]]:
        """The k rows most similar (cosine) to a unit `vector`: (image path as the metadata records it, score)."""
        return [(self.path(row), score) for row, score in self.search(np.asarray(vector, dtype=np.float32), k)[0]]


def _embed_job(emb_dir: Path) -> dict:
    path = emb_dir / "embed.json"
    if not path.is_file():
        return {}
    try:
        job = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}); {embeddings_fix(emb_dir)}") from e
    return job if isinstance(job, dict) else {}


def _check_complete(emb_dir: Path, job: dict) -> None:
    """An index covers a whole embed job: a part it has not finished would join later, out of order."""
    count = job.get("parts")
    if not isinstance(count, int):
        return
    names = [str(part).zfill(len(str(count))) for part in range(count)]
    missing = [name for name in names if not part_paths(emb_dir, name)["metadata"].is_file()]
    if missing:
        raise UserError(f"{emb_dir} is unfinished: {len(missing)} of {count} parts are not written (first: "
                        f"{part_paths(emb_dir, missing[0])['metadata']}); rerun the --mode embed command that wrote it "
                        "(it writes only those), then build the index")


def text_queries(emb: Embeddings, job: dict, config: dict, count: int, seed: int = 0
                 ) -> tuple[np.ndarray | None, str]:
    """(unit text vectors to tune on, where they came from): the embeddings' own caption vectors when they have
    them, else zero-shot prompts over OBJECT_NAMES (in the tower's language) encoded by the weights the embeddings
    were made with (the ones embed.json names when that file is still there, else model_path / phi), which must be
    those weights."""
    if emb.text:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(emb.total, size=min(count, emb.total), replace=False))
        return emb.rows_at(rows, "text_emb"), "the embeddings' captions"
    recorded = job.get("model")
    if recorded is None or str(recorded).startswith("random:"):
        return None, ("no text queries: the embeddings record no weights" if recorded is None
                      else "no text queries: the embeddings were made with random weights")
    import torch
    import torch.nn.functional as F

    from clip import CLIP
    from utils.eval.feature_cache import model_identity

    weights = job.get("model_path") if job.get("model_path") and Path(job["model_path"]).exists() else None
    model = CLIP(model_path=weights or config["model_path"], phi=job.get("phi") or config["phi"],
                 cuda=config.get("Cuda"), precision=config.get("precision"))
    if model_identity(model.weights_path or "", model.phi) != recorded:
        raise UserError(f"the embeddings in {emb.root} were made with other weights than {config['model_path']} "
                        f"({config['phi']}); mode index encodes text prompts with them to tune for text queries: give "
                        "the --model_path and --phi the embeddings were made with")
    texts = prompts_for(model.net.config.text, count, seed)
    with torch.no_grad():
        vectors = torch.cat([F.normalize(model.detect_image_for_eval(texts=texts[s:s + 64])[1].float(), dim=-1).cpu()
                             for s in range(0, len(texts), 64)])
    return vectors.numpy(), f"{len(texts)} prompts over common object names"


def run_index(config: dict) -> dict:
    """predict.py mode="index": build the index of embeddings_dir into index_dir and report on it."""
    faiss = _faiss()
    emb_dir, index_dir = Path(config["embeddings_dir"]), Path(config["index_dir"])
    memory = parse_memory(config["index_memory"])
    existing = read_manifest(index_dir, older=True)
    if existing is None:
        refuse_foreign_folder(index_dir, "the index")
    elif existing.get("embeddings_dir") == ".":
        raise UserError(f"index_dir {index_dir} is a folder search index (--mode search --dir_origin_path); "
                        "choose another index_dir")
    job = _embed_job(emb_dir)
    _check_complete(emb_dir, job)
    emb = Embeddings.open(emb_dir)
    n = sum(len(emb.kept(part)) for part in range(len(emb.names)))
    key = choose_key(n, emb.dim, memory, config["index_type"])
    new_index(key, emb.dim)  # a key FAISS cannot parse is refused before any work
    print(f"{n:,} vectors of dimension {emb.dim} in {len(emb.names)} parts of {emb_dir} -> {key}")
    if key == "Flat" and not emb.text:
        texts, source = None, "none needed (exact search)"
    else:
        texts, source = text_queries(emb, job, config, 1000)
    print(f"text queries: {source}")
    index, report = build(emb, key, text_queries=texts)
    index_dir.mkdir(parents=True, exist_ok=True)
    size = {}
    if key != "Flat":
        data = faiss.serialize_index(index).tobytes()
        atomic_write_bytes(data, index_dir / INDEX_FILE)
        size = {"index_bytes": len(data)}
    else:
        (index_dir / INDEX_FILE).unlink(missing_ok=True)  # an earlier build's, which nothing reads now
    model = {k: v for k, v in job.items() if k in ("model", "phi", "root")}
    write_manifest(index_dir, {"format": FORMAT, "embeddings_dir": str(emb_dir.resolve()), "key": key,
                               "dim": emb.dim, "parts": dict(zip(emb.names, emb.rows)), "vectors": report["vectors"],
                               **size, "params": report["params"], "removed": {}, **model, "report": report})
    params = ", ".join(f"{k}={v}" for k, v in report["params"].items())
    recalls = " and ".join(f"{report['recall_at_10'][kind]:.3f} on {count} {kind} queries"
                           for kind, count in report["queries"].items())
    print(f"index {index_dir}: {key}{f' ({params})' if params else ''}, {report['vectors']:,} vectors, "
          f"{human_size(report['memory_bytes'])} in memory, built in {report['build_seconds']:.1f} s, recall@10 "
          f"{recalls}, against exact search")
    return report
