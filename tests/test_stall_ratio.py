"""The trainer's stall ratio: in the status line (since the previous line) and as a Prometheus gauge."""
from __future__ import annotations

import io

from trainer.live_metrics import trainer_samples
from trainer.status import StatusLog, stall_ratio, status_line


def test_stall_ratio_is_the_waited_share_of_the_time():
    assert stall_ratio(0.5, 2.0) == 0.25
    assert stall_ratio(3.0, 2.0) == 1.0 and stall_ratio(-1.0, 2.0) == 0.0 and stall_ratio(1.0, 0.0) == 0.0


def test_the_status_line_shows_the_ratio_beside_the_stall_seconds():
    stats = {"reuse_mean": 1.5, "fresh_fraction_last": 0.25, "stall_seconds": 12.34}
    line = status_line(40, 200, 3.8, 1e-3, 152.3, 65.0, stats, stall_ratio=0.083)
    assert "| stall 12.3s (8%) |" in line
    assert "| stall 12.3s |" in status_line(40, 200, 3.8, 1e-3, 152.3, 65.0, stats)  # no ratio yet


def test_status_lines_count_the_ratio_from_the_previous_line():
    out = io.StringIO()
    log = StatusLog(None, interval=0.0, echo=True, stream=out)
    stall = {"stall_seconds": 5.0}
    log.start(0, stall_seconds=5.0)
    log.step(1, 10, 1.0, 0.1, 8, lambda: stall, force=True)  # no wait since start: 0%
    stall["stall_seconds"] = 5.0 + 1e9  # far more than the time between the lines: capped at 100%
    log.step(2, 10, 1.0, 0.1, 8, lambda: stall, force=True)
    lines = out.getvalue().splitlines()
    assert "stall 5.0s (0%)" in lines[0] and "(100%)" in lines[1]


def test_the_gauge_and_the_contract_and_feedback_counters_are_served():
    logs = {"train/loss": 1.0, "train/stall_ratio": 0.4}
    stats = {"stall_seconds": 3.0, "rate_limited_batches": 2, "feedback_messages": 4, "feedback_entries": 900,
             "feedback_dropped": 0}
    samples = {s.name: s for s in trainer_samples(7, logs, stats)}
    assert samples["stablerep_trainer_stall_ratio"].value == 0.4
    assert samples["stablerep_trainer_stall_ratio"].kind == "gauge"
    assert samples["stablerep_trainer_rate_limited_batches_total"].value == 2
    assert samples["stablerep_trainer_feedback_entries_total"].value == 900
