"""Notice when generation has stopped: no new group from any generator for too long.

A replay buffer keeps serving batches after every generator is gone (each group drawn again,
until ``max_reuse``), so a run could train for hours on a frozen buffer. ``GeneratorWatch`` looks
at when each endpoint last delivered a group: after a third of ``timeout_s`` without one from any
endpoint it warns (once per silence), after ``timeout_s`` it reports the run as stalled, naming
every endpoint and its last delivery. The trainer then saves a checkpoint and exits non-zero
(``--generator-timeout``; ``trainer.loop``).
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Callable, Mapping

log = logging.getLogger(__name__)

WARN_FRACTION = 1 / 3  # warn after this share of the timeout without a new group


class GeneratorsSilentError(RuntimeError):
    """No generator delivered a new group for ``--generator-timeout`` seconds."""


def _when(at: float | None, now: float) -> str:
    if at is None:
        return "never delivered a group"
    stamp = datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"last delivered at {stamp} ({now - at:.0f} s ago)"


class GeneratorWatch:
    """Silence detector over ``last_groups()`` (endpoint -> ``time.time()`` of its last group, or None).

    Args:
        timeout_s: seconds without a new group from any endpoint before ``check`` reports a stall.
        last_groups: e.g. ``GroupClient.last_groups``.
        started_at: ``time.time()`` the watch counts from while no group has arrived at all.
    """

    def __init__(self, timeout_s: float, last_groups: Callable[[], Mapping[str, float | None]],
                 started_at: float | None = None) -> None:
        if not timeout_s > 0:
            raise ValueError(f"generator timeout must be > 0 seconds, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.last_groups = last_groups
        self.started_at = time.time() if started_at is None else float(started_at)
        self._warned_for: float | None = None

    def latest(self) -> float:
        """``time.time()`` of the newest group from any endpoint (the start while none came)."""
        times = [t for t in self.last_groups().values() if t is not None]
        return max(times, default=self.started_at)

    def seconds_left(self, now: float | None = None) -> float:
        """Seconds until the timeout, counting from the newest group (<= 0: timed out)."""
        now = time.time() if now is None else now
        return self.latest() + self.timeout_s - now

    def check(self, now: float | None = None) -> str | None:
        """``None`` while some generator delivered recently; else the stall message (warns once before)."""
        now = time.time() if now is None else now
        latest = self.latest()
        silent_s = now - latest
        if silent_s >= self.timeout_s:
            return self.describe(now, f"no new group from any generator for {silent_s:.0f} s "
                                      f"(--generator-timeout {self.timeout_s:g})")
        if silent_s >= WARN_FRACTION * self.timeout_s and self._warned_for != latest:
            self._warned_for = latest
            log.warning("%s; the run stops with a checkpoint after %g s of silence",
                        self.describe(now, f"no new group from any generator for {silent_s:.0f} s"), self.timeout_s)
        return None

    def describe(self, now: float, headline: str) -> str:
        endpoints = "; ".join(f"{url} {_when(at, now)}" for url, at in sorted(self.last_groups().items()))
        return f"{headline}: {endpoints}"
