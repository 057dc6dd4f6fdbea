"""Training from WebDataset shards: each sample at most once per epoch across processes and workers, exact resume."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from utils.data.toy import make_toy_dataset
from tests.conftest import free_port
from tests.test_training import run_train, step_losses, train_args
from utils.data.augment import CaptionAugment
from utils.data.sources.pipeline import convert
from utils.data.sources.shards import is_shard_source
from utils.data.sources.stream import ShardStream, span
from utils.tokenizer import build_tokenizer

SHARD_SIZE = 5


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The toy train split (40 images) as 8 shards of 5, and its val JSON, through convert.py."""
    root = tmp_path_factory.mktemp("shards")
    make_toy_dataset(root / "toy", n_train=40, n_val=8, seed=4)
    convert(dict(source="jsonl", input=str(_as_jsonl(root / "toy" / "en_train.json")), output_dir=str(root),
                 name="toy", images="", val_ratio=0.0, test_ratio=0.0, seed=0, to="wds", shard_size=SHARD_SIZE,
                 image_column="filepath", caption_column="title", separator="", phi="tiny/VIT-T-8",
                 bert_vocab_path="", skip_malformed=False, overwrite=False))
    return root


def _as_jsonl(json_path: Path) -> Path:
    out = json_path.with_suffix(".jsonl")
    out.write_text("\n".join(json.dumps(e) for e in json.loads(json_path.read_text())))
    return out


def _stream(root: Path, rank=0, world_size=1, workers=0, batch=4, **extra) -> ShardStream:
    return ShardStream(str(root / "toy_train" / "{00000..00007}.tar"), CaptionAugment(64, "light"),
                       build_tokenizer("openai", 77), batch, seed=3, rank=rank, world_size=world_size,
                       workers=workers, **extra)


def test_shard_sources_are_recognised():
    assert is_shard_source("shards/{00000..00127}.tar") and is_shard_source("one.tar")
    assert is_shard_source("train.shards") and not is_shard_source("train.json")
    assert not is_shard_source("train.csv") and not is_shard_source("train.jsonl")


def test_span_follows_the_loaders_turns():
    # Two workers, 10 batches: worker 0 makes positions 0, 2, 4, 6, 8; worker 1 positions 1, 3, 5, 7, 9.
    assert [span(w, 2, 0, 10) for w in range(2)] == [(0, 5), (0, 5)]
    assert [span(w, 2, 3, 10) for w in range(2)] == [(2, 5), (1, 5)]  # positions 0, 2 and 1 were trained
    assert [span(w, 3, 4, 8) for w in range(3)] == [(2, 3), (1, 3), (1, 2)]


@pytest.mark.slow
@pytest.mark.parametrize("world_size, workers", [(1, 1), (2, 2), (2, 1)])
def test_every_sample_is_used_at_most_once_per_epoch_across_ranks_and_workers(shards, world_size, workers):
    for epoch in range(3):
        seen, batches_per_rank = [], []
        for rank in range(world_size):
            stream = _stream(shards, rank, world_size, workers)
            stream.set_epoch(epoch)
            got = [keys for worker in range(stream.workers) for keys, _, _ in stream.worker_batches(worker)]
            batches_per_rank.append(len(got))
            seen += [key for keys in got for key in keys]
        assert len(seen) == len(set(seen))  # at most once
        assert batches_per_rank == [stream.batches_per_epoch()] * world_size  # ranks step together
        # 8 shards of 5 over ranks x workers, batch 4: each worker sure of 8 // (N * W) shards.
        assert stream.batches_per_epoch() == workers * (SHARD_SIZE * (8 // (world_size * workers)) // 4)
    orders = []
    for epoch in range(2):
        stream = _stream(shards)
        stream.set_epoch(epoch)
        orders.append([k for keys, _, _ in stream.worker_batches(0) for k in keys])
    assert orders[0] != orders[1] and sorted(orders[0]) != []  # reshuffled every epoch


@pytest.mark.slow
def test_a_resumed_epoch_yields_exactly_the_rest_with_loader_workers(shards):
    stream = _stream(shards, workers=2)
    stream.set_epoch(1)
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    full = list(loader)
    assert len(full) == len(loader) == stream.batches_per_epoch() == 10
    stream.set_epoch(1, start_batch=3)
    rest = list(DataLoader(stream, batch_size=None, num_workers=2))
    assert len(rest) == 7
    for (pixels, tokens), (again_pixels, again_tokens) in zip(full[3:], rest):
        assert torch.equal(pixels, again_pixels) and torch.equal(tokens, again_tokens)


def test_samples_per_epoch_caps_an_epoch_and_corrupt_samples_are_skipped(shards, tmp_path, capsys):
    assert _stream(shards, samples_per_epoch=12).batches_per_epoch() == 3
    import shutil
    import tarfile
    broken = tmp_path / "broken"
    shutil.copytree(shards / "toy_train", broken)
    with tarfile.open(broken / "00000.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(broken / "00000.tar", "w") as tar:
        import io
        for member, data in members:
            data = b"not a jpeg" if member.name.endswith("000000001.jpg") else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    stream = ShardStream(str(broken / "{00000..00007}.tar"), CaptionAugment(64, "none"), build_tokenizer("openai", 77),
                         4, seed=3)
    got = [k for keys, _, _ in stream.worker_batches(0) for k in keys]
    assert "000000001" not in got and len(got) == 4 * stream.batches_per_epoch()
    assert "skipped sample 000000001" in capsys.readouterr().err


def test_too_few_shards_or_samples_for_the_processes_is_refused(shards):
    from utils.errors import UserError
    with pytest.raises(UserError, match="8 shards cannot feed 2 process"):
        _stream(shards, rank=0, world_size=2, workers=5)
    with pytest.raises(UserError, match="may get fewer than 16 samples"):
        _stream(shards, rank=0, world_size=2, workers=2, batch=16)


@pytest.mark.slow
def test_two_gloo_processes_train_from_shards_and_resume_exactly(shards, tmp_path):
    data = dict(datasets_path=shards / "toy", datasets_train_json_path=shards / "toy_train" / "{00000..00007}.tar",
                datasets_val_json_path=shards / "toy" / "en_val.json", Epoch=2, num_workers=1)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    straight = run_train(train_args(shards / "toy", tmp_path / "a", distributed="true", **data), launcher=launcher)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "processes=2" in straight.stdout and "40 train / 8 val images, 5 steps per epoch" in straight.stdout
    first = run_train(train_args(shards / "toy", tmp_path / "b", distributed="true", stop_after_steps=3, **data),
                      launcher=launcher)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train(train_args(shards / "toy", tmp_path / "b", distributed="true", resume="auto", **data),
                       launcher=launcher)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    assert step_losses(tmp_path / "a") == pytest.approx(step_losses(tmp_path / "b"), abs=1e-6)
    assert len(step_losses(tmp_path / "a")) == 10
    a = torch.load(tmp_path / "a" / "last_epoch_weights.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "last_epoch_weights.pth", weights_only=True)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
