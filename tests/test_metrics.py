"""Live metrics: name rules, the samples both services derive from their stats, and the list in docs/metrics.md."""
from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from generator_service.live_metrics import generator_samples
from generator_service.pool_types import PoolStats
from infra.metrics_server import MetricsServer, Sample
from protocol.server import ServerStats
from trainer.live_metrics import trainer_samples
from trainer.data.replay import ReplayBuffer

METRICS_DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def _pool_stats() -> PoolStats:
    worker = {"index": 0, "device": "cpu", "pid": 1, "alive": True, "ready": True, "groups": 3, "images": 12,
              "gen_seconds": 1.5, "restarts": 1, "batch_limit": 8, "idle_backpressure_s": 0.25}
    return PoolStats(elapsed_s=2.0, groups_delivered=3, images_delivered=12, in_flight=0, pending=1, undelivered=0,
                     duplicates_dropped=0, requeued=0, settled_at_stop=0, restarts=1, workers=[worker])


def _replay_stats() -> dict:
    replay = ReplayBuffer(4, 2, 8, 8)
    try:
        return replay.stats()
    finally:
        replay.close()


def test_the_generator_idle_ratio_is_its_workers_share_of_time_held_back():
    samples = {s.name: s.value for s in generator_samples(_pool_stats(), None)}
    assert samples["stablerep_generator_idle_ratio"] == pytest.approx(0.25 / (0.25 + 1.5))


def test_sample_names_follow_the_rules():
    with pytest.raises(ValueError, match="stablerep_"):
        Sample("other_metric", "gauge", "x", 1.0)
    with pytest.raises(ValueError, match="_total"):
        Sample("stablerep_x", "counter", "x", 1.0)


def test_every_metric_is_listed_in_the_metrics_page():
    page = METRICS_DOC.read_text()
    server = ServerStats(clients={"t#0@ab": {"credits": 3, "groups_sent": 2}}, queue_depth=1, queue_capacity=8)
    names = {s.name for s in generator_samples(_pool_stats(), server)}
    logs = {"train/loss": 1.0, "train/lr": 0.1, "train/images_per_s": 5.0, "train/images_seen": 10}
    stats = {**_replay_stats(), "groups_received": 1, "reconnects": 0, "bad_messages": 0}
    names |= {s.name for s in trainer_samples(3, logs, stats)}
    assert len(names) > 30
    listed = set(re.findall(r"`([a-z_]+)`", page))
    for name in names:
        short = re.sub(r"^stablerep_(generator|trainer)_", "", name)
        assert short in listed, f"{name} is not in the metric tables of docs/metrics.md"


def test_server_serves_the_latest_snapshot():
    server = MetricsServer(0, addr="127.0.0.1")
    try:
        server.set([Sample("stablerep_test_images_total", "counter", "n", 7, {"device": "cpu"}),
                    Sample("stablerep_test_depth", "gauge", "d", np.float64(2.5))])
        text = urllib.request.urlopen(server.url, timeout=30).read().decode()
        assert 'stablerep_test_images_total{device="cpu"} 7.0' in text
        assert "stablerep_test_depth 2.5" in text
        assert "# TYPE stablerep_test_images_total counter" in text
    finally:
        server.close()
