"""Shards served read-only over plain HTTP (Python's http.server on 127.0.0.1, tests/http_server.py):
``--data http://HOST/shards`` reads every group once per epoch, in the same order and with the same
images as the same shards on local disk, and trains."""
from __future__ import annotations

import json

import pytest

from tests.http_server import http_store
from tests.train_helpers import tiny_offline_args, write_shards
from trainer import cli
from trainer.data.sources.offline import OfflineSource

pytest.importorskip("aiohttp")  # fsspec's HTTP filesystem


def test_shards_over_http_read_like_local_ones_and_train(tmp_path):
    shards = write_shards(tmp_path / "store" / "shards", num_captions=24, m=2, size=32, groups_per_shard=8)
    with http_store(tmp_path / "store") as base:
        url = f"{base}/shards"
        local = OfflineSource(str(shards), captions_per_rank=6, draw_per_caption=2, num_workers=0, seed=4)
        remote = OfflineSource(url, captions_per_rank=6, draw_per_caption=2, num_workers=0, seed=4)
        assert remote.index.num_samples == 24 and remote.image_size == 32
        ids = []
        for _ in range(8):  # two epochs
            a, b = local.next_batch(), remote.next_batch()
            assert a.caption_ids.tolist() == b.caption_ids.tolist() and a.images.equal(b.images)
            ids += b.caption_ids.tolist()
        assert sorted(ids[:24]) == sorted(ids[24:]) == list(range(24))
        assert remote.stats()["skipped_corrupt"] == 0

        out = tmp_path / "run"
        assert cli.main(tiny_offline_args(url, out, 2, "--no-progress")) == 0  # type: ignore[arg-type]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["stopped"] == "completed"
