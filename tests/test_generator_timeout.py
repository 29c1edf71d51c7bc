"""The trainer stops when generation stops: --generator-timeout, a checkpoint first, exit 3."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from generator_service.procedural import write_caption_file
from tests.test_train_cli import train_args
from tests.polling import wait_for
from tests.train_helpers import free_port, free_tcp_endpoint, scrape_metrics
from trainer import cli
from trainer.checkpoint import find_checkpoint
from trainer.data.sources.generator_watch import GeneratorWatch

REPO = Path(__file__).resolve().parents[1]


def test_watch_warns_at_a_third_then_reports_every_endpoint(caplog):
    last = {"tcp://a:1": 1000.0, "tcp://b:2": None}
    watch = GeneratorWatch(60.0, lambda: last, started_at=900.0)
    with caplog.at_level(logging.WARNING):
        assert watch.check(now=1010.0) is None and not caplog.records
        assert watch.check(now=1021.0) is None
        assert watch.check(now=1030.0) is None  # warned once per silence
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "for 21 s" in warnings[0]
    message = watch.check(now=1060.0)
    assert message is not None and "for 60 s (--generator-timeout 60)" in message
    assert "tcp://a:1 last delivered at 1970-01-01 00:16:40 UTC (60 s ago)" in message
    assert "tcp://b:2 never delivered a group" in message
    last["tcp://b:2"] = 1059.0  # a group arrived: silence over, and a new silence warns again
    assert watch.check(now=1060.0) is None and watch.seconds_left(now=1060.0) == pytest.approx(59.0)
    with caplog.at_level(logging.WARNING):
        assert watch.check(now=1080.0) is None
    assert len(caplog.records) == 2


def test_watch_counts_from_the_start_while_nothing_arrived():
    watch = GeneratorWatch(30.0, lambda: {"tcp://a:1": None}, started_at=100.0)
    assert watch.check(now=129.0) is None
    assert "never delivered a group" in watch.check(now=130.0)
    with pytest.raises(ValueError, match="generator timeout must be > 0"):
        GeneratorWatch(0, dict)


def _generated_groups(metrics_port: int) -> float:
    """The service's ``stablerep_generator_groups_total`` counters, summed (0 while it serves no metrics yet)."""
    try:
        samples = scrape_metrics(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
    except OSError:
        return 0.0
    return sum(value for name, value in samples.items() if name.startswith("stablerep_generator_groups_total"))


@pytest.mark.parametrize("reuse", [[], ["--max-reuse", "2"]], ids=["frozen-buffer", "buffer-runs-dry"])
def test_trainer_exits_3_with_a_checkpoint_when_the_generator_is_gone(tmp_path, capsys, reuse):
    """A service that serves 40 groups and exits: the trainer keeps drawing from its buffer (or,
    with --max-reuse, waits once it is used up), then stops within --generator-timeout of the last
    group, with a checkpoint it can resume from.

    The trainer starts once the service has generated a group (its metrics say so), so a slow
    worker start on a loaded machine cannot turn the test into the "never delivered" case."""
    captions = write_caption_file(tmp_path / "captions.txt", 40)
    endpoint = free_tcp_endpoint()
    metrics_port = free_port()
    service = subprocess.Popen(
        [sys.executable, "-m", "generator_service.cli", "--captions", str(captions), "--backend", "procedural",
         "--bind", endpoint, "--height", "32", "--width", "32", "--save-size", "32", "--images-per-group", "4",
         "--gpus", "cpu", "--max-groups", "40", "--no-progress", "--log-level", "WARNING", "--drain-timeout", "2",
         "--metrics-port", str(metrics_port)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    out = tmp_path / "run"
    try:
        assert wait_for(lambda: _generated_groups(metrics_port) >= 1 or service.poll() is not None,
                        "the generator service's first group", timeout=120)
        assert service.poll() is None, "the generator service exited before serving"
        code = cli.main(train_args(endpoint, out, 100000, "--generator-timeout", "6", "--replay-capacity", "40",
                                     *reuse))
    finally:
        service.kill()
        service.wait()
    err = capsys.readouterr().err
    assert code == cli.EXIT_GENERATORS_SILENT, err
    assert "generation stopped: no new group from any generator for" in err
    assert f"{endpoint} last delivered at" in err and "checkpoint" in err
    checkpoint = find_checkpoint("auto", out)
    assert checkpoint is not None
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] >= 1 and state["source_stats"]["groups_received"] == 40
