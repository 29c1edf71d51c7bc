"""Fetching ahead from an object store: a worker fetches chunks of ranged GETs (one per group), the
next chunk while it decodes one, and still yields exactly the groups of its plan, in plan order, with
the same images as one GET at a time and as the same shards on local disk; a shard deleted while GETs
are in flight is counted and skipped. The store is moto's real S3 server on 127.0.0.1 (tests/s3_server.py)."""
from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from tests.s3_server import s3_server
from trainer import cli
from trainer.data.sources import SourceContext
from tests.test_offline_source import write_generator_dir
from trainer.data.sources.offline import OfflineSource
from trainer.data.sources.offline_reader import iterate_samples
from trainer.data.sources.offline_stream import epoch_order

pytest.importorskip("s3fs")
pytest.importorskip("moto")

SHARDS, PER_SHARD, M = 3, 8, 3
URL = "s3://bucket/shards"


@pytest.fixture
def shards(monkeypatch, tmp_path):
    """The same generator shards on local disk and in the bucket; yields the local folder."""
    local = tmp_path / "shards"
    write_generator_dir(local, shards=SHARDS, per_shard=PER_SHARD, m=M)
    with s3_server(monkeypatch) as _:
        client = boto3.client("s3")
        for entry in sorted(local.iterdir()):
            client.upload_file(str(entry), "bucket", f"shards/{entry.name}")
        yield local


def plan_items(source: OfflineSource, fetch_ahead: int, epoch: int = 0, seed: int = 5, after=None, direct_gets=True):
    """Every item of one worker's plan (the whole shuffled epoch) as ``(caption id, image bytes)``,
    ``None`` for a skipped sample; ``after(k)`` runs once ``k`` items were taken."""
    samples = epoch_order(source.index.num_samples, epoch, seed, shuffle=True)
    items = iterate_samples(samples, source.index, source.parts, source.tables, worker=0, epoch=epoch, seed=seed,
                            n=2, image_size=source.image_size, fetch_ahead=fetch_ahead, direct_gets=direct_gets)
    out = []
    for k, item in enumerate(items):
        if after is not None:
            after(k)
        out.append(None if item.group is None else (item.group.caption_id, item.group.images.numpy().tobytes()))
    return samples, out


def test_fetching_ahead_yields_the_plan_in_order(shards: Path):
    local = OfflineSource(str(shards), captions_per_rank=4, draw_per_caption=2, num_workers=0)
    remote = OfflineSource(URL, captions_per_rank=4, draw_per_caption=2, num_workers=0)
    samples, expected = plan_items(local, fetch_ahead=1)
    assert len(expected) == SHARDS * PER_SHARD and None not in expected
    assert [cid for cid, _ in expected] == samples.tolist() != sorted(samples.tolist())  # the shuffled plan, in order
    for ahead in (1, 4, 64):  # one GET at a time; chunks fetched one ahead; one chunk longer than the plan
        assert plan_items(remote, fetch_ahead=ahead)[1] == expected, ahead
    assert plan_items(remote, fetch_ahead=4, direct_gets=False)[1] == expected  # through the filesystem's client

    # --fetch-ahead and --no-direct-gets reach the source
    cfg, _ = cli.parse_config(["--preset", "cpu_small", "--source", "offline", "--data", URL, "--draw-per-caption", "2", "--fetch-ahead", "4",
                               "--no-direct-gets"])
    assert (cfg.data.fetch_ahead, cfg.data.direct_gets) == (4, False)
    configured = OfflineSource.from_config(cfg.data, cfg.replay, SourceContext(captions_per_rank=4, rank=0, world_size=1,
                                                                              seed=0))
    assert (configured.fetch_ahead, configured.direct_gets) == (4, False)

    # the source itself, two DataLoader workers each fetching ahead: the same groups in the same order
    local = OfflineSource(str(shards), captions_per_rank=4, draw_per_caption=2, num_workers=2, seed=3)
    remote = OfflineSource(URL, captions_per_rank=4, draw_per_caption=2, num_workers=2, seed=3)
    for _ in range(8):  # 32 groups: an epoch and a third
        a, b = local.next_batch(), remote.next_batch()
        assert a.caption_ids.tolist() == b.caption_ids.tolist() and local.batch_epochs == remote.batch_epochs
        assert a.images.equal(b.images)
    local.close()
    remote.close()


def test_a_shard_deleted_while_fetching_ahead_is_counted_and_skipped(shards: Path):
    remote = OfflineSource(URL, captions_per_rank=4, draw_per_caption=2, num_workers=0)
    ahead, delete_after = 4, 5
    gone = set(range((SHARDS - 1) * PER_SHARD, SHARDS * PER_SHARD))  # caption ids of the last shard

    def delete(k: int) -> None:
        if k == delete_after:
            boto3.client("s3").delete_object(Bucket="bucket", Key="shards/shard-000002.tar")

    samples, items = plan_items(remote, fetch_ahead=ahead, after=delete)
    plan = samples.tolist()
    assert len(items) == len(plan)  # one item per position: nothing lost, nothing repeated
    for position, (g, item) in enumerate(zip(plan, items)):
        if g not in gone or position < delete_after:  # read before the delete, or from an intact shard
            assert item is not None and item[0] == g, position
        elif position >= delete_after + 2 * ahead:  # its GET started after the delete (a chunk is fetched ahead)
            assert item is None, position
    assert sum(item is None for item in items) >= sum(g in gone for g in plan[delete_after + 2 * ahead:]) > 0

    # through the source: counted in skipped_corrupt, every intact group still read once per epoch
    boto3.client("s3").upload_file(str(shards / "shard-000002.tar"), "bucket", "shards/shard-000002.tar")
    remote = OfflineSource(URL, captions_per_rank=4, draw_per_caption=2, num_workers=0)
    read: list[tuple[int, int]] = []  # (epoch, caption id)
    for k in range(40):
        if k == 2:
            boto3.client("s3").delete_object(Bucket="bucket", Key="shards/shard-000002.tar")
        batch = remote.next_batch()
        read += list(zip(remote.batch_epochs, batch.caption_ids.tolist()))
        if remote.batch_epochs[-1] == 2:
            break
    intact = set(range(SHARDS * PER_SHARD)) - gone
    epoch_0 = [cid for e, cid in read if e == 0]
    assert len(set(epoch_0)) == len(epoch_0) and intact <= set(epoch_0)
    assert sorted(cid for e, cid in read if e == 1) == sorted(intact)
    assert remote.stats()["skipped_corrupt"] >= (SHARDS * PER_SHARD - len(epoch_0)) + PER_SHARD


def test_a_store_without_async_reads_fetches_ahead_on_threads(tmp_path):
    """fsspec's in-memory filesystem has no async API: its reads run one by one on the fetcher's thread."""
    fsspec = pytest.importorskip("fsspec")
    local_dir = tmp_path / "shards"
    write_generator_dir(local_dir, shards=SHARDS, per_shard=PER_SHARD, m=M)
    store = fsspec.filesystem("memory")
    assert not store.async_impl
    for entry in sorted(local_dir.iterdir()):
        store.pipe_file(f"/fetch-ahead/shards/{entry.name}", entry.read_bytes())
    try:
        local = OfflineSource(str(local_dir), captions_per_rank=4, draw_per_caption=2, num_workers=0)
        remote = OfflineSource("memory://fetch-ahead/shards", captions_per_rank=4, draw_per_caption=2, num_workers=0)
        expected = plan_items(local, fetch_ahead=1)[1]
        for ahead in (1, 4):
            assert plan_items(remote, fetch_ahead=ahead)[1] == expected, ahead
    finally:
        store.rm("/fetch-ahead", recursive=True)
