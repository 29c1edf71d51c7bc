"""Where finished groups go: shards, the online server, a preview grid, or several of these.

Every sink has ``offer(group) -> bool``: False means "not now, offer the same group again later"
(the pool keeps it and retries); True means the sink took it.
"""
from __future__ import annotations

import logging
from typing import Any

from generator_service.shards import ShardWriter
from generator_service.pool_types import GroupSink
from protocol import Group

log = logging.getLogger(__name__)


class ShardSink:
    """Writes every group to a ``ShardWriter``; never refuses."""

    def __init__(self, writer: ShardWriter) -> None:
        self.writer = writer

    def offer(self, group: Group) -> bool:
        self.writer.write(group)
        return True


class ServerSink:
    """Queues groups on a ``GroupServer``; refuses (without waiting) while its queue is full."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def offer(self, group: Group) -> bool:
        return bool(self.server.put(group, timeout=0))


class PreviewSink:
    """Keeps the first ``limit`` groups and writes their preview grid to ``path`` as soon as it has
    them (or, via ``write``, at the end of a shorter run); never refuses."""

    def __init__(self, path: str, limit: int) -> None:
        self.path = path
        self.limit = limit
        self.groups: list[Group] = []
        self.written = False

    def offer(self, group: Group) -> bool:
        if len(self.groups) < self.limit:
            self.groups.append(group)
            if len(self.groups) == self.limit:
                self.write()
        return True

    def write(self) -> None:
        if self.written or not self.groups:
            return
        from generator_service.preview import write_preview

        write_preview(self.groups, self.path)
        self.written = True
        log.info("preview of %d group(s) written to %s", len(self.groups), self.path)


class FanOutSink:
    """Offers each group to several sinks in order; a group is delivered once all took it.

    A sink that refuses is offered the same group again later; the sinks before it are not.
    """

    def __init__(self, sinks: list[GroupSink]) -> None:
        self.sinks = sinks
        self._head: str | None = None
        self._taken = 0

    def offer(self, group: Group) -> bool:
        if group.group_id != self._head:
            self._head, self._taken = group.group_id, 0
        while self._taken < len(self.sinks):
            if not self.sinks[self._taken].offer(group):
                return False
            self._taken += 1
        self._head = None
        return True

    def settle(self, group: Group) -> None:
        """Offer ``group`` once to every sink that has not taken it yet, ignoring refusals."""
        start = self._taken if group.group_id == self._head else 0
        for sink in self.sinks[start:]:
            sink.offer(group)
        self._head = None
