"""What flows through the worker pool: work items, sinks for finished groups, the stop signal, stats."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol

from protocol import Group


class PoolError(RuntimeError):
    """The pool cannot go on (a worker cannot start, or keeps dying)."""


@dataclass
class WorkItem:
    """One caption group to generate. ``epoch`` counts passes over the caption set (online mode)."""

    group_id: str
    caption_id: int
    caption: str
    seeds: list[int]
    epoch: int = 0


class GroupSink(Protocol):
    """Where finished groups go. ``offer`` returns False to refuse for now (back-pressure).

    A sink may also define ``settle(group)``: called at a stop for groups it was never able to
    take, to keep what can be kept (e.g. write them to an archive) without waiting.
    """

    def offer(self, group: Group) -> bool: ...


class StopSignal:
    """Set by signal handlers: one request drains and stops, a second one stops at once."""

    def __init__(self) -> None:
        self.requests = 0
        self._event = threading.Event()

    def request(self, *_: Any) -> None:
        self.requests += 1
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    @property
    def immediate(self) -> bool:
        return self.requests >= 2

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a stop request; True if one came."""
        return self._event.wait(timeout)


@dataclass
class PoolStats:
    """A snapshot for progress displays."""

    elapsed_s: float
    groups_delivered: int
    images_delivered: int
    in_flight: int
    pending: int
    undelivered: int
    duplicates_dropped: int
    requeued: int
    settled_at_stop: int
    restarts: int
    workers: list[dict[str, Any]]

    @property
    def images_per_second(self) -> float:
        return self.images_delivered / self.elapsed_s if self.elapsed_s > 0 else 0.0
