"""What the service keeps per trainer client, who it admits and evicts, and the counters it reports
(``GroupServer.stats``)."""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

#: The ROUTER names each connection of a peer that sets no routing id ``b"\0"`` + 4 bytes (libzmq).
GENERATED_ID_BYTES = 5
#: a session silent for this many heartbeat intervals (and holding no unacknowledged group) may be
#: evicted to make room for a new ``hello`` at ``max_clients`` (dead is at 3), as may one that sent
#: nothing since its ``hello``.
EVICT_AFTER_HEARTBEATS = 2


def chosen_routing_id(identity: bytes) -> bool:
    """True for a routing id the peer set itself (``ZMQ_ROUTING_ID``): one that outlives its connection."""
    return len(identity) != GENERATED_ID_BYTES or identity[0] != 0


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

    def acknowledge(self, ack: str) -> int | None:
        """Forget the unacknowledged groups up to and including ``ack`` (a group id); how many, 0 for an
        empty ``ack``, None for an id this client does not hold unacknowledged (nothing is forgotten)."""
        if not ack:
            return 0
        if not any(sent.group_id == ack for sent in self.unacked):
            return None
        count = 0
        while self.unacked:
            sent = self.unacked.popleft()
            self.unacked_bytes -= sent.nbytes
            count += 1
            if sent.group_id == ack:
                break
        return count


def evictable(clients: dict[bytes, ClientInfo], now: float, idle_after: float) -> bytes | None:
    """The session to drop for a new ``hello`` at ``max_clients``, or None: one holding no
    unacknowledged group that sent nothing since its ``hello`` (the longest silent first) or, failing
    that, has been silent for over ``idle_after`` seconds (the longest silent first)."""
    candidates = [(c.followed_up, c.last_seen, identity) for identity, c in clients.items()
                  if not c.unacked and (not c.followed_up or now - c.last_seen > idle_after)]
    return min(candidates)[2] if candidates else None


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
