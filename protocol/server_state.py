"""What the service keeps per trainer client, and the counters it reports (``GroupServer.stats``)."""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SentGroup:
    """A group sent to a client and not yet acknowledged: re-queued whole if the client goes."""

    group_id: str
    frames: list[Any]
    nbytes: int


@dataclass
class ClientInfo:
    """What the service knows of one connected trainer."""

    name: str
    rank: int
    world_size: int
    credits: int = 0
    groups_sent: int = 0
    last_seen: float = 0.0
    last_sent: float = 0.0
    unacked: collections.deque = field(default_factory=collections.deque)
    unacked_bytes: int = 0
    blocked_until: float = 0.0
    followed_up: bool = False  # sent a credit or heartbeat since its hello (not half-open)

    @property
    def outstanding(self) -> int:
        return self.credits + len(self.unacked)


@dataclass
class ServerStats:
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    queue_depth: int = 0
    queue_capacity: int = 0
    groups_sent: int = 0
    bytes_sent: int = 0
    bad_messages: int = 0
    handler_errors: int = 0
    dead_clients: int = 0
    left_clients: int = 0
    refused_clients: int = 0
    evicted_clients: int = 0  # idle sessions dropped to make room for a new hello at max_clients
    credit_clamped: int = 0
    requeued: int = 0
    acked: int = 0
    unknown_acks: int = 0  # credits whose ack named no group this client holds unacknowledged
    put_wait_seconds: float = 0.0
    heartbeats_received: int = 0
    auth_refused: int = 0  # CURVE handshakes refused (client key not authorized); 0 without CURVE
    failed: str | None = None
