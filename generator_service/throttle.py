"""A rate limit on the work handed to the worker pool (``--max-groups-per-s``).

It stands in for a slower device: a CPU service throttled to R groups/s behaves, for the trainer,
like a GPU generator making R groups/s, so generator:trainer ratios can be studied on a laptop.
Items are released on a fixed schedule (item ``i`` no earlier than ``start + i / rate``); a stop
request ends the wait at once.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from generator_service.pool_types import StopSignal

T = TypeVar("T")


def throttled(items: Iterable[T], max_per_s: float, stop: StopSignal) -> Iterator[T]:
    """Yield ``items`` at most ``max_per_s`` per second on average (no burst beyond the schedule)."""
    if not max_per_s > 0:
        raise ValueError(f"--max-groups-per-s must be > 0, got {max_per_s}")
    start = time.monotonic()
    for index, item in enumerate(items):
        delay = start + index / max_per_s - time.monotonic()
        if delay > 0 and stop.wait(delay):
            return
        yield item
