"""stablerep-bench online on CPU: real generator services + the real fed step; live metrics served meanwhile."""
from __future__ import annotations

import json

import pytest

from benchmarks.cli import main
from benchmarks.online_bench import run_online_bench
from tests.train_helpers import free_port, scrape_metrics

ONLINE_KEYS = ("trainer_images_per_s", "generated_images_per_s", "trainer_stall_fraction",
               "generator_idle_fraction", "mean_reuse", "evicted_unused_fraction")


def test_quick_cli_json_has_its_keys(tmp_path):
    assert main(["online", "--quick", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "online.json").read_text())["results"]
    for key in ONLINE_KEYS:
        assert isinstance(results[key], float), key
    assert results["trainer_images_per_s"] > 0 and results["generated_images_per_s"] > 0
    assert 0.0 <= results["trainer_stall_fraction"] <= 1.0
    assert 0.0 <= results["generator_idle_fraction"] <= 1.0
    assert 0.0 <= results["evicted_unused_fraction"] <= 1.0


def test_metrics_endpoints_serve_stablerep_samples_during_a_run():
    scraped: dict[str, dict[str, float]] = {}

    def on_step(step: int) -> None:
        if step == 3:  # mid-run: both services are live
            scraped["trainer"] = scrape_metrics(f"http://127.0.0.1:{ports['trainer']}/metrics")
            scraped["generator"] = scrape_metrics(f"http://127.0.0.1:{ports['generator']}/metrics")

    ports = {name: free_port() for name in ("trainer", "generator")}
    result = run_online_bench(generators=1, steps=2, warmup=2, metrics_port=ports["trainer"],
                              generator_metrics_port=ports["generator"], on_step=on_step)
    trainer, generator = scraped["trainer"], scraped["generator"]
    assert trainer["stablerep_trainer_step"] == 3
    assert trainer["stablerep_trainer_images_seen_total"] == 3 * result["images_per_step"]
    for name in ("images_per_s", "loss", "lr", "stall_seconds_total", "buffer_groups", "reuse_mean",
                 "staleness_mean_seconds", "evicted_unused_total", "groups_received_total"):
        assert f"stablerep_trainer_{name}" in trainer, name
    assert trainer["stablerep_trainer_groups_received_total"] > 0
    assert generator['stablerep_generator_images_total{device="cpu",worker="0"}'] > 0
    for name in ("queue_depth", "clients", "credits", "worker_restarts_total", "bad_messages_total",
                 "put_wait_seconds_total"):
        assert any(key.startswith(f"stablerep_generator_{name}") for key in generator), name
    assert generator["stablerep_generator_clients"] == 1


def test_bad_flags_are_named():
    with pytest.raises(ValueError, match="--generators"):
        run_online_bench(generators=0)
    with pytest.raises(ValueError, match="--generator-rate"):
        run_online_bench(generator_rate=0)
