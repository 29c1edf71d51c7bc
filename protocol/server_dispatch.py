"""What the service sends: control messages to one client, queued groups round-robin to clients with
credit, heartbeats; and the reaping of clients that went silent or unreachable.

A group is sent without blocking: a client whose pipe is full is skipped for a quarter heartbeat,
one whose connection is gone (EHOSTUNREACH) is marked unreachable and dropped by the reaper once
every message that arrived from it was read. Dropping a client re-queues its unacknowledged groups
(``ClientTable.drop``).
"""
from __future__ import annotations

from typing import Any

import zmq

from .bounds import clip
from .limits import DEAD_AFTER_HEARTBEATS
from .messages import Heartbeat
from .server_state import ClientTable, SentGroup, log
from .sockets import monotonic, send


class Dispatcher:
    """Sends for the I/O thread of a ``GroupServer`` (which owns the socket).

    Args:
        table: the service's sessions and queue.
        max_message_bytes: largest message sent.
        recv_batch, slice_s: most groups / seconds of sending per loop turn.
        heartbeat_ms: heartbeat interval; a client silent for ``DEAD_AFTER_HEARTBEATS`` of them is dead.
    """

    def __init__(self, table: ClientTable, max_message_bytes: int, recv_batch: int, slice_s: float,
                 heartbeat_ms: int) -> None:
        self.table = table
        self.max_message_bytes = max_message_bytes
        self.recv_batch = recv_batch
        self.slice_s = slice_s
        self.heartbeat_ms = heartbeat_ms

    def send(self, socket: zmq.Socket, identity: bytes, msg: Any) -> bool:
        """Send a control message to one client; False if it could not be sent (gone, or its queue full)."""
        try:
            send(socket, msg, identity=identity, max_bytes=self.max_message_bytes)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: peer gone; EAGAIN: peer's queue full
            log.debug("send to %s failed: %s", identity.hex(), exc)
            return False
        with self.table.cond:
            client = self.table.clients.get(identity)
            if client is not None:
                client.last_sent = monotonic()
        return True

    def dispatch(self, socket: zmq.Socket) -> bool:
        """Send queued groups round-robin to clients with credit (at most ``recv_batch`` per turn,
        or ``slice_s`` seconds); True if more could be sent at once."""
        table = self.table
        deadline = monotonic() + self.slice_s
        for _ in range(self.recv_batch):
            now = monotonic()
            with table.cond:
                if not table.queue:
                    return False
                ident = table.next_client(now)
                if ident is None:
                    return False
                item = table.queue.popleft()
                table.cond.notify_all()
            frames = [ident, *item[1]]
            try:
                socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as exc:
                with table.cond:
                    table.queue.appendleft(item)  # not sent: keep it for someone else
                    if exc.errno == zmq.EHOSTUNREACH and ident in table.clients:
                        # Its connection is gone, but what it sent last (a bye, an ack) may still wait
                        # unread: the reaper drops it once every message that arrived was read.
                        table.clients[ident].unreachable = max(1, table.clients[ident].unreachable)
                    elif ident in table.clients:  # its pipe is full: skip it for a tick
                        table.clients[ident].blocked_until = now + max(0.001, self.heartbeat_ms / 4000.0)
                continue
            nbytes = sum(memoryview(f).nbytes for f in frames[1:])
            with table.cond:
                client = table.clients.get(ident)
                if client is not None:
                    client.credits -= 1
                    client.groups_sent += 1
                    client.last_sent = monotonic()
                    client.unacked.append(SentGroup(item[0], item[1], nbytes))
                    client.unacked_bytes += nbytes
                table.stats.groups_sent += 1
                table.stats.bytes_sent += nbytes
            if monotonic() > deadline:
                return True
        return True

    def heartbeat_and_reap(self, socket: zmq.Socket, reap: bool = True) -> None:
        """Drop clients silent for ``DEAD_AFTER_HEARTBEATS`` intervals or unreachable (when ``reap``),
        then send a heartbeat to each client sent nothing for an interval."""
        table = self.table
        now = monotonic()
        interval = self.heartbeat_ms / 1000.0
        with table.cond:
            if reap:  # an unreachable client goes after one more drained receive: its last messages are read
                for c in table.clients.values():
                    c.unreachable += bool(c.unreachable)
            dead = [i for i, c in table.clients.items()
                    if reap and (c.unreachable > 2 or now - c.last_seen > DEAD_AFTER_HEARTBEATS * interval)]
            for ident in dead:
                c = table.clients[ident]
                if not c.unreachable:
                    log.warning("client %s#%d silent for > %d heartbeats: dropping its %d credits", clip(c.name, 60),
                                c.rank, DEAD_AFTER_HEARTBEATS, c.credits)
                table.drop(ident, "dead")
            due = [i for i, c in table.clients.items() if now - c.last_sent >= interval]
        for ident in due:
            self.send(socket, ident, Heartbeat())
