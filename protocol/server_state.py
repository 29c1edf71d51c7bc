"""What the service keeps per trainer client, who it admits and evicts, and the counters it reports
(``GroupServer.stats``)."""
from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from .bounds import clip
from .feedback import FeedbackAllowance

#: The service logs under one name, whichever of its modules speaks.
log = logging.getLogger("protocol.server")

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
    #: its pace of ``feedback`` (set by the session handler on the first one)
    feedback_allowance: FeedbackAllowance | None = None

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
    feedback_merged: int = 0  # feedback messages folded into the caption scores
    feedback_entries: int = 0  # (caption id, score) pairs of those, served ids only
    feedback_unknown_ids: int = 0  # pairs naming a caption this service does not serve: ignored
    feedback_rate_limited: int = 0  # feedback messages over a client's allowance: dropped, not answered
    failed: str | None = None


class ClientTable:
    """The service's sessions and its queue of encoded groups, under one lock (``cond``).

    ``queue`` holds ``(group_id, frames)`` waiting for a client with credit; ``clients`` maps a
    routing id to its session, ``rr`` is their round-robin order. The methods keep the books of
    admission, credit, acknowledgement, re-queueing and eviction; their callers hold ``cond``.
    """

    def __init__(self, max_queue: int, max_credit: int, max_clients: int, max_client_bytes: int) -> None:
        self.max_credit = max_credit
        self.max_clients = max_clients
        self.max_client_bytes = max_client_bytes
        self.cond = threading.Condition()
        self.queue: collections.deque[tuple[str, list[Any]]] = collections.deque()
        self.clients: dict[bytes, ClientInfo] = {}
        self.rr: collections.deque[bytes] = collections.deque()
        self.stats = ServerStats(queue_capacity=max_queue)

    def admit(self, identity: bytes, name: str, rank: int, world_size: int, now: float) -> bool:
        """Open a session for a ``hello`` (a second one on the same socket starts it afresh, its
        unacknowledged groups re-queued); at ``max_clients``, evict an idle one first. False: refused."""
        client = self.clients.get(identity)
        if client is None and len(self.clients) >= self.max_clients:
            self.evict_idle()
        if client is None and len(self.clients) >= self.max_clients:
            self.stats.refused_clients += 1
            return False
        if client is not None:  # a second hello: a new session on the same socket
            self.requeue(client, "sent a new hello")
        else:
            self.rr.append(identity)
        self.clients[identity] = ClientInfo(name, rank, world_size, last_seen=now, last_sent=now, settled_at=now)
        return True

    def grant(self, client: ClientInfo, n: int, ack: str, now: float) -> int:
        """Acknowledge up to ``ack``, then add ``n`` credits, clamped so the client holds at most
        ``max_credit`` (credit plus unacknowledged groups); returns the credits granted."""
        self.acknowledge(client, ack, now)
        room = self.max_credit - client.outstanding
        granted = max(0, min(n, room))
        client.credits += granted
        if granted < n:
            self.stats.credit_clamped += 1
        return granted

    def acknowledge(self, client: ClientInfo, ack: str, now: float) -> None:
        """``ack`` (a group id) acknowledges that group and all sent before it to this client; an
        empty or unknown id acknowledges nothing (counted in ``stats.unknown_acks``)."""
        acked = client.acknowledge(ack, now)
        if acked is None:
            self.stats.unknown_acks += 1
        else:
            self.stats.acked += acked

    def requeue(self, client: ClientInfo, why: str) -> None:
        """Put a client's unacknowledged groups back at the front of the queue, oldest first (logged
        with their count: each may reach a trainer twice)."""
        count = len(client.unacked)
        if count:
            log.info("client %s#%d %s: re-queueing its %d unacknowledged group(s), %s .. %s", clip(client.name, 60),
                     client.rank, why, count, clip(client.unacked[0].group_id, 60), clip(client.unacked[-1].group_id, 60))
        while client.unacked:
            sent = client.unacked.pop()
            self.queue.appendleft((sent.group_id, sent.frames))
            self.stats.requeued += 1
        client.unacked_bytes = 0
        client.credits = 0

    def evict_idle(self) -> None:
        """At ``max_clients``, make room for a new ``hello`` by dropping the session that has held no
        unacknowledged group for longest, heartbeats or not (``evictable``). So neither a storm of
        hellos nor sessions that only heartbeat can lock trainers out, and a trainer that streams
        is never evicted."""
        identity = evictable(self.clients)
        if identity is not None:
            self.drop(identity, "evicted")

    def drop(self, identity: bytes, why: str) -> None:
        """End a session (``why``: "left", "evicted" or "dead"), re-queueing its unacknowledged groups."""
        client = self.clients.pop(identity, None)
        if client is None:
            return
        self.requeue(client, {"left": "said bye", "evicted": "was evicted"}.get(why, "is gone (silent or unreachable)"))
        try:
            self.rr.remove(identity)
        except ValueError:
            pass
        if why == "left":
            self.stats.left_clients += 1
        elif why == "evicted":
            self.stats.evicted_clients += 1
        else:
            self.stats.dead_clients += 1

    def next_client(self, now: float) -> bytes | None:
        """The next client in round-robin order that has credit, room and an unblocked pipe."""
        for _ in range(len(self.rr)):
            ident = self.rr[0]
            self.rr.rotate(-1)
            c = self.clients.get(ident)
            if (c is not None and c.credits > 0 and c.unacked_bytes < self.max_client_bytes and c.blocked_until <= now
                    and not c.unreachable):
                return ident
        return None
