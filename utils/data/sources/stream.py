"""Training straight from WebDataset tar shards, for data that outgrows a JSON list or one disk.

Each epoch the shards are shuffled by (seed, epoch) and dealt out: rank r of N takes every N-th shard, and
its loader worker w of W every W-th of those, so within an epoch every sample is read by one process at most.
Each worker shuffles its samples in a buffer seeded by (seed, epoch, rank, worker) and yields whole batches;
the DataLoader takes them from the workers in turn. All of that is fixed by the seed and the per-shard sample
counts (read once and cached beside the shards), so every rank knows in advance how many batches the epoch
has (the batches every rank is sure of, so that DDP's processes step together), and a resumed run replays
the interrupted epoch and drops the batches it already trained, landing on the same next batch.
"""
from __future__ import annotations

import json
import sys
import tarfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from utils.data.images import open_image
from utils.data.pictures import decode_sides
from utils.data.sources.shards import IMAGE_EXTENSIONS, member_key, sample_captions, samples, shard_paths
from utils.errors import UserError
from utils.files import atomic_write_bytes

COUNTS_FILE = ".clip_sample_counts.json"
SHUFFLE_BUFFER = 1000


def shard_counts(shards: list[Path]) -> list[int]:
    """Samples per shard, counted once and cached beside the shards (keyed by size and modification time)."""
    cache_path = shards[0].parent / COUNTS_FILE
    try:
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    counts, changed = [], False
    for shard in shards:
        stat = shard.stat()
        key = f"{shard.name}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in cache:
            cache[key] = sum(1 for _ in _keys(shard))
            changed = True
        counts.append(cache[key])
    if changed:
        try:  # atomic: DDP's processes count at the same time
            atomic_write_bytes(json.dumps(cache).encode("utf-8"), cache_path)
        except (OSError, UserError):
            pass  # a read-only shard folder just counts again next time
    return counts


def _keys(shard: Path):
    try:
        with tarfile.open(shard) as tar:
            last = None
            for member in tar:
                if member.isfile():
                    key = member_key(member.name)[0]
                    if key != last:
                        yield key
                        last = key
    except tarfile.TarError as e:
        raise UserError(f"{shard} is not a readable tar file ({e}); re-create it or leave it out") from e


def span(worker: int, workers: int, start: int, stop: int) -> tuple[int, int]:
    """(first, end) of a worker's own batches at positions [start, stop) of the order the DataLoader takes
    them in, one from each worker in turn: position p is worker p % workers' batch p // workers."""
    def before(position: int) -> int:
        return max(0, -(-(position - worker) // workers))
    return before(start), before(stop)


class ShardStream(IterableDataset):
    """(pixels, tokens) batches of `local_batch` from shards; `set_epoch(epoch, start_batch)` before each pass."""

    def __init__(self, pattern: str, transform: Callable, tokenizer: Callable, local_batch: int, seed: int,
                 rank: int = 0, world_size: int = 1, workers: int = 0, samples_per_epoch: int = 0,
                 fast_decode: bool = True):
        self.shards = shard_paths(pattern)
        # JPEGs decoded only as large as the transform needs; fast_decode=False decodes in full.
        self.sides = decode_sides(transform) if fast_decode else None
        self.counts = shard_counts(self.shards)
        self.transform, self.tokenizer = transform, tokenizer
        self.local_batch, self.seed = local_batch, seed
        self.rank, self.world_size, self.workers = rank, world_size, max(workers, 1)
        self.samples_per_epoch = samples_per_epoch
        if len(self.shards) < self.world_size * self.workers:
            raise UserError(f"{len(self.shards)} shards cannot feed {self.world_size} process(es) x {self.workers} "
                            "loader worker(s) without reading a sample twice; write smaller shards (convert.py "
                            "--to wds --shard_size) or lower num_workers")
        self.epoch, self.start_batch = 0, 0
        if self.batches_per_epoch() == 0:
            raise UserError(f"{pattern}: some of the {self.world_size} x {self.workers} loader workers may get fewer "
                            f"than {local_batch} samples (one batch per process) in an epoch; lower num_workers or "
                            "batch_size, or cap less with train_samples_per_epoch")

    def total_samples(self) -> int:
        return sum(self.counts)

    def _shards_of(self, epoch: int, rank: int, worker: int) -> list[int]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return list(order[rank::self.world_size][worker::self.workers])

    def batches_per_epoch(self) -> int:
        """Batches every rank makes each epoch: what its workers can make whichever shards the shuffle deals
        them (each gets at least S // (N*W) shards, at worst the smallest), so the schedule's steps per epoch
        hold for every epoch and DDP's processes step together; capped by samples_per_epoch."""
        per_worker = len(self.shards) // (self.world_size * self.workers)
        sure = self.workers * (sum(sorted(self.counts)[:per_worker]) // self.local_batch)
        if self.samples_per_epoch:
            sure = min(sure, self.samples_per_epoch // (self.local_batch * self.world_size))
        return sure

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start_batch

    def _raw_samples(self, shard_ids: list[int], rng: np.random.Generator):
        """(key, files) from the worker's shards through a seeded shuffle buffer."""
        buffer = []
        for shard_id in shard_ids:
            for sample in samples(self.shards[shard_id]):
                buffer.append(sample)
                if len(buffer) >= SHUFFLE_BUFFER:
                    yield buffer.pop(int(rng.integers(len(buffer))))
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def _decode(self, key: str, files: dict, rng: np.random.Generator):
        extension = next((e for e in IMAGE_EXTENSIONS if e in files), None)
        captions = [c for c in sample_captions(files) if isinstance(c, str) and c.strip()]
        if extension is None or not captions:
            raise ValueError("no image" if extension is None else "no caption")
        image = open_image(files[extension], self.sides)
        caption = captions[int(rng.integers(len(captions)))]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2 ** 63)))
            pixels, caption = self.transform(image, caption)
        return pixels, self.tokenizer(caption)[0]

    def __iter__(self):
        info = get_worker_info()
        workers_here = info.num_workers if info is not None else 1
        if workers_here != self.workers:
            raise RuntimeError(f"ShardStream was planned for {self.workers} workers, runs in {workers_here}")
        for _keys, pixels, tokens in self.worker_batches(info.id if info is not None else 0):
            yield pixels, tokens

    def worker_batches(self, worker: int):
        """(sample keys, pixels, tokens) of the batches loader worker `worker` of this rank makes this epoch.

        The DataLoader starts every pass at its worker 0, so after a resume at batch s its worker w plays the part
        of worker (w + s) % W of the uninterrupted pass: the batches then come in the same order."""
        worker = (worker + self.start_batch) % self.workers
        first, end = span(worker, self.workers, self.start_batch, self.batches_per_epoch())
        shards = self._shards_of(self.epoch, self.rank, worker)
        skipped, batch, made = 0, [], 0
        # A worker always has the batches planned for it unless samples turned out corrupt; then it reads its
        # shards again rather than leave its rank a step short, which would stall the other DDP processes.
        for cycle in range(1 + bool(end)):
            if cycle:
                print(f"a loader worker is {end - made} batch(es) short after skipping {skipped} corrupt sample(s); "
                      "it reuses samples of its shards to keep the processes in step", file=sys.stderr)
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, cycle])
            for key, files in self._raw_samples(shards, rng):
                if made >= end:
                    return
                # Batches before `first` were trained before a resume; they are decoded all the same, as which
                # samples turn out corrupt decides where every later batch starts.
                try:
                    sample_rng = np.random.default_rng([self.seed, self.epoch, cycle, hash_key(key)])
                    batch.append((key, *self._decode(key, files, sample_rng)))
                except Exception as e:  # a corrupt sample is skipped and counted, never fatal
                    skipped += 1
                    if made >= first and not cycle:
                        print(f"skipped sample {key} ({type(e).__name__}: {e}); {skipped} skipped by this loader "
                              "worker this epoch", file=sys.stderr)
                    continue
                if len(batch) == self.local_batch:
                    if made >= first:
                        keys, pixels, tokens = zip(*batch)
                        yield list(keys), torch.stack(pixels), torch.stack(tokens)
                    batch, made = [], made + 1
            if made >= end:
                return


def hash_key(key: str) -> int:
    """A stable (unlike hash()) integer of a sample key, for its caption choice and augmentation."""
    return zlib.crc32(key.encode("utf-8"))
