"""Offline resume on any layout: a run stopped mid-epoch on W ranks x K workers continues on W' x K'
and reads every group of the interrupted epoch exactly once (none twice, none skipped), also when a
rank skipped a corrupt group. Ranks are real gloo processes on 127.0.0.1; states go through the
checkpoint's JSON files."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.test_offline_source import write_generator_dir
from tests.train_helpers import free_port
from trainer.checkpoint import load_source_state
from trainer.data.sources.offline import OfflineSource
from trainer.data.sources.offline_stream import StreamBasis, merge_progress

G = 3  # groups per rank per batch before the stop


def open_source(data: Path, rank: int, world: int, workers: int, captions: int) -> OfflineSource:
    return OfflineSource(str(data), captions_per_rank=captions, draw_per_caption=2, rank=rank, world_size=world,
                         num_workers=workers, seed=11)


def read_until_epoch(source: OfflineSource, epoch: int, batches: int | None = None) -> list[tuple[int, int]]:
    """``(epoch, caption id)`` of every group read: ``batches`` batches, or until a batch reaches ``epoch``."""
    out: list[tuple[int, int]] = []
    while batches is None or batches > 0:
        batch = source.next_batch()
        out += list(zip(source.batch_epochs, batch.caption_ids.tolist()))
        if batches is not None:
            batches -= 1
        elif source.batch_epochs[-1] >= epoch:
            break
    return out


def _rank(rank: int, world: int, port: int, data: str, state_dir: str, phase: str, workers: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        if phase == "first":
            source = open_source(Path(data), rank, world, workers, G)
            read = read_until_epoch(source, 0, batches=4)
            Path(state_dir, f"source_state_{rank}.json").write_text(json.dumps(source.state_dict()))
        else:
            source = open_source(Path(data), rank, world, workers, 6 // world)
            source.load_state_dict(load_source_state(state_dir, rank))
            read = read_until_epoch(source, 1)
        source.close()
        gathered: list = [None] * world
        dist.all_gather_object(gathered, read)
        if rank == 0:
            Path(state_dir, f"read_{phase}.json").write_text(json.dumps([g for r in gathered for g in r]))
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, data: Path, state_dir: Path, phase: str, workers: int) -> list[tuple[int, int]]:
    mp.spawn(_rank, args=(world, free_port(), str(data), str(state_dir), phase, workers), nprocs=world, join=True)
    return [tuple(x) for x in json.loads((state_dir / f"read_{phase}.json").read_text())]


@pytest.mark.timeout(300)
def test_two_ranks_resume_on_one_and_three_reading_each_group_once(tmp_path):
    ids = write_generator_dir(tmp_path / "data", shards=5, per_shard=7, m=2, bad_image=(17, 0))  # 35 groups, 1 corrupt
    readable = Counter(c for c in ids if c != 17)
    state = tmp_path / "state"
    state.mkdir()
    first = run_ranks(2, tmp_path / "data", state, "first", workers=2)
    assert len(first) == 2 * 4 * G and all(e == 0 for e, _ in first)
    for world, workers in ((1, 0), (3, 1)):
        if world == 1:  # one rank: this process
            source = open_source(tmp_path / "data", 0, 1, workers, 6)
            source.load_state_dict(load_source_state(state, 0))
            after = read_until_epoch(source, 1)
        else:
            after = run_ranks(world, tmp_path / "data", state, f"resume{world}", workers=workers)
        epoch0 = Counter(c for e, c in first + after if e == 0)
        assert epoch0 == readable, (world, epoch0 - readable, readable - epoch0)  # each group once
        assert any(e == 1 for e, _ in after)  # the stream continues into the next epoch


def test_a_state_of_another_data_set_or_seed_is_refused(tmp_path):
    write_generator_dir(tmp_path / "a", shards=1, per_shard=6, m=2)
    write_generator_dir(tmp_path / "b", shards=1, per_shard=8, m=2)
    source = open_source(tmp_path / "a", 0, 1, 0, 2)
    source.next_batch()
    state = json.loads(json.dumps(source.state_dict()))
    other = open_source(tmp_path / "b", 0, 1, 0, 2)
    with pytest.raises(ValueError, match="field num_samples = 6 in the checkpoint, 8"):
        other.load_state_dict(state)
    reseeded = OfflineSource(str(tmp_path / "a"), 2, 2, num_workers=0, seed=12)
    with pytest.raises(ValueError, match="field seed = 11"):
        reseeded.load_state_dict(state)
    with pytest.raises(ValueError, match="older layout-dependent version"):
        reseeded.load_state_dict({"epoch": 0, "positions": {}})


def _rank_stream(basis: StreamBasis, rank: int, num_samples: int, count: int) -> list[int]:
    """The first ``count`` stream positions rank ``rank`` reads under ``basis``."""
    out: list[int] = []
    epoch = basis.first_epoch(num_samples)
    while len(out) < count:
        out += basis.rank_positions(epoch, num_samples, rank).tolist()
        epoch += 1
    return out[:count]


def test_merged_progress_reads_every_position_once_over_chained_resumes():
    rng = np.random.default_rng(0)
    for _ in range(40):
        N = int(rng.integers(5, 40))
        basis, read = StreamBasis(0, world_size=int(rng.integers(1, 5))), []
        for _ in range(3):  # three stops and resumes, each on a new layout
            W = basis.world_size
            base = int(rng.integers(0, 2 * N // W + 1))
            consumed = [base + int(rng.integers(0, 3)) for _ in range(W)]  # ranks that skipped corrupt groups read more
            for r in range(W):
                read += _rank_stream(basis, r, N, consumed[r])
            basis = merge_progress(basis, consumed, int(rng.integers(1, 5)))
            assert all(t not in read for t in range(basis.start, basis.start + 3 * N) if t not in set(basis.skip))
            assert set(basis.skip) <= set(read) and all(t in read for t in range(basis.start))
        assert len(read) == len(set(read))  # no stream position read twice
        horizon = max(read) + 1
        final = [t for r in range(basis.world_size) for t in _rank_stream(basis, r, N, horizon)]
        covered = sorted(set(read) | {t for t in final if t < horizon})
        assert covered == list(range(horizon)) and not set(read) & {t for t in final if t < horizon}
