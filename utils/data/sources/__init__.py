"""Caption datasets in other layouts, read as records for datasets/convert.py.

Each reader takes a `Source` (what the user pointed at) and yields `Record`s: an image file, its captions and
the split the layout assigns (None where it has none). Problems with the input are collected in the source's
`Problems` and reported together, each naming its file and line, row or record.
"""
from utils.data.sources.annotations import read_coco, read_flickr8k, read_karpathy
from utils.data.sources.cn_clip import read_cn_clip
from utils.data.sources.folder import read_folder
from utils.data.sources.records import Problems, Record, Source
from utils.data.sources.shards import read_wds
from utils.data.sources.tabular import read_csv, read_jsonl

SOURCES = {
    "karpathy": read_karpathy,
    "coco": read_coco,
    "flickr8k": read_flickr8k,
    "csv": read_csv,
    "folder": read_folder,
    "jsonl": read_jsonl,
    "cn-clip": read_cn_clip,
    "wds": read_wds,
}

__all__ = ["SOURCES", "Problems", "Record", "Source"]
