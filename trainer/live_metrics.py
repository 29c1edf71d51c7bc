"""The trainer's live metrics (``stablerep-train --metrics-port``), from the numbers the loop logs.

Names (all ``stablerep_trainer_*``), refreshed at every log step (``--log-every``):

- ``step``, ``images_seen_total``: optimizer steps done, images trained on;
- ``images_per_s``: images per second over the last ``--log-every`` steps;
- ``loss``, ``lr``: the last step's loss and learning rate;
- ``stall_seconds_total``: seconds the step waited for the source (online / replay);
- ``stall_ratio``: the trainer's stall ratio, the share of the last ``--log-every`` steps' time the draws
  waited for groups (or for the rate contract); the generators report their own idle time;
- ``rate_limited_batches_total``: batches that waited for the replay buffer's rate contract
  (``--samples-per-insert``);
- ``feedback_messages_total``, ``feedback_entries_total``, ``feedback_dropped_total``: caption feedback
  sent to the generators (``--feedback-every``): messages, caption scores, scores dropped (refused, or
  waiting too long);
- ``buffer_groups`` / ``buffer_capacity_groups``: replay buffer occupancy;
- ``reuse_mean`` / ``reuse_max``: draws per group over every group seen;
- ``staleness_mean_seconds`` / ``staleness_max_seconds``: age of a group when drawn;
- ``fresh_fraction``: share of the last batch's groups never drawn before;
- ``groups_added_total``, ``evicted_total``, ``evicted_unused_total``, ``dropped_total``: buffer traffic
  (``evicted_unused``: groups evicted without ever being drawn);
- ``repeated_groups_total``: arrivals dropped because their group id was already held (re-sends
  after a reconnect, or generators serving the same captions with the same seed);
- ``groups_received_total``, ``reconnects_total``, ``bad_messages_total``: the online client;
- ``knn_top1{probe=...}`` (and ``linear_top1{probe=...}`` with ``--monitor-linear``): the monitor's
  last accuracy per probe folder, ``monitor_step``: the step it was measured at,
  ``monitor_failures_total``: monitor evaluations that failed (trainer/monitor.py).
"""
from __future__ import annotations

from typing import Any

from infra.metrics_server import MetricsServer, Sample

P = "stablerep_trainer_"
# (source stats key, metric name, kind, help)
_SOURCE = (
    ("stall_seconds", "stall_seconds_total", "counter", "seconds the step waited for the source"),
    ("rate_limited_batches", "rate_limited_batches_total", "counter", "batches that waited for the rate contract"),
    ("feedback_messages", "feedback_messages_total", "counter", "caption feedback messages sent to generators"),
    ("feedback_entries", "feedback_entries_total", "counter", "caption scores sent to generators"),
    ("feedback_dropped", "feedback_dropped_total", "counter", "caption scores dropped before being sent"),
    ("size", "buffer_groups", "gauge", "caption groups in the replay buffer"),
    ("capacity", "buffer_capacity_groups", "gauge", "replay buffer capacity in groups"),
    ("reuse_mean", "reuse_mean", "gauge", "draws per group, mean over every group seen"),
    ("reuse_max", "reuse_max", "gauge", "draws of the most drawn group"),
    ("staleness_mean_s", "staleness_mean_seconds", "gauge", "mean age of a group when drawn"),
    ("staleness_max_s", "staleness_max_seconds", "gauge", "largest age of a group when drawn"),
    ("fresh_fraction_last", "fresh_fraction", "gauge", "share of the last batch's groups never drawn before"),
    ("added", "groups_added_total", "counter", "groups added to the replay buffer"),
    ("evicted", "evicted_total", "counter", "groups evicted from the replay buffer"),
    ("evicted_unused", "evicted_unused_total", "counter", "groups evicted without ever being drawn"),
    ("dropped", "dropped_total", "counter", "groups dropped on arrival"),
    ("repeats", "repeated_groups_total", "counter", "groups dropped because their id was already held"),
    ("groups_received", "groups_received_total", "counter", "groups received from generators"),
    ("reconnects", "reconnects_total", "counter", "reconnections to generators"),
    ("bad_messages", "bad_messages_total", "counter", "malformed messages received from generators"),
)


def trainer_samples(step: int, logs: dict[str, float], source_stats: dict[str, Any]) -> list[Sample]:
    """Samples from the loop's ``logs`` (``train/loss``, ``train/lr``, ...) and ``source.stats()``."""
    out = [Sample(P + "step", "gauge", "optimizer steps done", step)]
    for key, name, kind, text in (
        ("train/images_seen", "images_seen_total", "counter", "images trained on"),
        ("train/images_per_s", "images_per_s", "gauge", "images per second over the last log interval"),
        ("train/loss", "loss", "gauge", "loss of the last step"),
        ("train/lr", "lr", "gauge", "learning rate of the last step"),
        ("train/stall_ratio", "stall_ratio", "gauge", "share of the last log interval the draws waited for the source"),
    ):
        if key in logs:
            out.append(Sample(P + name, kind, text, float(logs[key])))
    for key, name, kind, text in _SOURCE:
        value = source_stats.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(Sample(P + name, kind, text, float(value)))
    return out


def monitor_samples(rows: list[dict[str, Any]], failures: int) -> list[Sample]:
    """One gauge per probe and accuracy from the monitor's rows of one evaluation (trainer/monitor.py)."""
    out = [Sample(P + "monitor_failures_total", "counter", "monitor evaluations that failed", float(failures))]
    if rows:
        out.append(Sample(P + "monitor_step", "gauge", "step of the last monitor evaluation", float(rows[0]["step"])))
    for row in rows:
        for key, text in (("knn_top1", "weighted k-NN top-1 (%) of the backbone on a probe folder"),
                          ("linear_top1", "quick linear probe top-1 (%) of the backbone on a probe folder")):
            if key in row:
                out.append(Sample(P + key, "gauge", text, float(row[key]), {"probe": str(row["probe"])}))
    return out


class TrainerMetrics:
    """Serve the trainer's metrics on ``port``; ``update`` and ``set_monitor`` replace their parts of the snapshot."""

    def __init__(self, port: int, addr: str = "0.0.0.0") -> None:
        self.server = MetricsServer(port, addr)
        self._training: list[Sample] = []
        self._monitor: list[Sample] = []

    @property
    def url(self) -> str:
        return self.server.url

    def update(self, step: int, logs: dict[str, float], source_stats: dict[str, Any]) -> None:
        self._training = trainer_samples(step, logs, source_stats)
        self.server.set(self._training + self._monitor)

    def set_monitor(self, rows: list[dict[str, Any]], failures: int) -> None:
        self._monitor = monitor_samples(rows, failures)
        self.server.set(self._training + self._monitor)

    def close(self) -> None:
        self.server.close()
