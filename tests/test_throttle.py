"""The generator's --max-groups-per-s throttle: a schedule, interrupted by a stop request."""
from __future__ import annotations

import threading
import time

import pytest

from generator_service.throttle import throttled
from generator_service.pool_types import StopSignal


def test_items_follow_the_schedule():
    stop = StopSignal()
    start = time.monotonic()
    released = []
    for item in throttled(range(5), 50.0, stop):
        released.append((item, time.monotonic() - start))
    assert [i for i, _ in released] == [0, 1, 2, 3, 4]
    for index, at in released:  # item i no earlier than i / rate
        assert at >= index / 50.0 - 1e-3


def test_a_stop_request_ends_the_wait():
    stop = StopSignal()
    items = throttled(range(3), 1e-3, stop)  # the second item would wait 1000 s
    assert next(items) == 0
    threading.Thread(target=stop.request).start()
    assert list(items) == []


def test_rate_must_be_positive():
    with pytest.raises(ValueError, match="--max-groups-per-s"):
        list(throttled(range(1), 0.0, StopSignal()))
