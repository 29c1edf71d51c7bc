"""What the service keeps per trainer client, who it admits and evicts, and the counters it reports
(``GroupServer.stats``)."""
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
    #: 0, or receive turns since its connection was found gone (EHOSTUNREACH): dropped once its last messages are read
    unreachable: int = 0
    #: since when it holds no unacknowledged group (its hello, or the ack that emptied ``unacked``)
    settled_at: float = 0.0

    @property
    def streaming(self) -> bool:
        """Holds unacknowledged groups, or has received groups and holds credit for more: never evicted."""
        return bool(self.unacked) or (self.credits > 0 and self.groups_sent > 0)

    @property
    def outstanding(self) -> int:
        return self.credits + len(self.unacked)

    def acknowledge(self, ack: str, now: float = 0.0) -> int | None:
        """Forget the unacknowledged groups up to and including ``ack`` (a group id); how many, 0 for an
        empty ``ack``, None for an id this client does not hold unacknowledged (nothing is forgotten).
        An ack that leaves nothing unacknowledged sets ``settled_at`` to ``now``."""
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
        if not self.unacked:
            self.settled_at = now
        return count


def evictable(clients: dict[bytes, ClientInfo]) -> bytes | None:
    """The session to drop for a new ``hello`` at ``max_clients``, or None: of those that do not
    stream (``ClientInfo.streaming``), the one that has held no unacknowledged group for longest.
    Heartbeats do not count: a session that only says it is alive holds its place until a newer
    one needs it."""
    candidates = [(c.settled_at, identity) for identity, c in clients.items() if not c.streaming]
    return min(candidates)[1] if candidates else None


@dataclass
class ServerStats:
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    queue_depth: int = 0
    queue_capacity: int = 0
    groups_sent: int = 0
    bytes_sent: int = 0
    bad_messages: int = 0
    client_errors: int = 0  # ``error`` messages from clients (e.g. about a group they could not use)
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
