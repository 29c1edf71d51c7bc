"""Service side of protocol v1: a ROUTER socket that hands groups to clients by credit.

One I/O thread owns the socket. Producers call ``put(group)``, which blocks while the bounded
queue is full (that wait is the generator's idle time). Each group goes to exactly one client
that has credit; a client is sent at most as many groups as it granted. Clients silent for more
than three heartbeat intervals are dead: their credits are dropped and the queue keeps every group
not yet sent.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import zmq

from .codec import decode, encode
from .errors import ProtocolError
from .generator_info import GeneratorInfo
from .limits import DEAD_AFTER_HEARTBEATS, MAX_MESSAGE_BYTES
from .messages import Bye, Credit, Error, Group, Heartbeat, Hello, Welcome
from .sockets import WakePipe, configure, monotonic, send

log = logging.getLogger(__name__)



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


@dataclass
class ServerStats:
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    queue_depth: int = 0
    queue_capacity: int = 0
    groups_sent: int = 0
    bytes_sent: int = 0
    bad_messages: int = 0
    dead_clients: int = 0
    put_wait_seconds: float = 0.0
    heartbeats_received: int = 0


class GroupServer:
    """Serve caption groups to trainer clients over a ROUTER socket.

    Args:
        bind: ZeroMQ endpoint, e.g. ``tcp://127.0.0.1:5555`` (``tcp://127.0.0.1:*`` picks a port;
            read it back from ``endpoint``).
        service_id: name sent in ``welcome``.
        generator_info: the generator description sent in ``welcome`` (a map is checked and converted).
        heartbeat_ms: heartbeat interval; a client silent for 3 intervals is dead.
        max_queue: groups held while no client has credit; ``put`` blocks beyond it.
    """

    def __init__(
        self,
        bind: str,
        service_id: str,
        generator_info: GeneratorInfo | dict[str, Any],
        heartbeat_ms: int = 1000,
        max_queue: int = 64,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        context: zmq.Context | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.bind = bind
        self.service_id = service_id
        self.generator_info = (
            generator_info if isinstance(generator_info, GeneratorInfo) else GeneratorInfo.from_wire(generator_info)
        )
        self.heartbeat_ms = int(heartbeat_ms)
        self.max_queue = int(max_queue)
        self.max_message_bytes = int(max_message_bytes)
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._queue: collections.deque[tuple[str, list[Any]]] = collections.deque()
        self._cond = threading.Condition()
        self._clients: dict[bytes, ClientInfo] = {}
        self._stats = ServerStats(queue_capacity=self.max_queue)
        self._wake = WakePipe()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self.endpoint: str | None = None

    # --- producer side ------------------------------------------------------------------------
    def start(self) -> "GroupServer":
        self._thread = threading.Thread(target=self._run, name="group-server-io", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            self._release()
            raise self._start_error
        return self

    def put(self, group: Group, timeout: float | None = None) -> bool:
        """Queue a group for the next client with credit. Blocks while the queue is full.

        Returns False if ``timeout`` passed first or the server is closed. Raises
        ``ProtocolError`` at once for a group that cannot be encoded.
        """
        frames = encode(group, self.max_message_bytes)
        start = monotonic()
        with self._cond:
            while len(self._queue) >= self.max_queue and not self._stop.is_set():
                remaining = None if timeout is None else timeout - (monotonic() - start)
                if remaining is not None and remaining <= 0:
                    self._stats.put_wait_seconds += monotonic() - start
                    return False
                self._cond.wait(remaining if remaining is not None else 0.5)
            self._stats.put_wait_seconds += monotonic() - start
            if self._stop.is_set():
                return False
            self._queue.append((group.group_id, frames))
            # Without credit anywhere the I/O thread dispatches when credit arrives: no wake-up needed.
            dispatchable = any(client.credits > 0 for client in self._clients.values())
        if dispatchable:
            self._wake.wake()
        return True

    def stats(self) -> ServerStats:
        with self._cond:
            stats = dataclasses.replace(self._stats)
            stats.queue_depth = len(self._queue)
            stats.clients = {
                f"{c.name}#{c.rank}@{ident.hex()[:8]}": {"credits": c.credits, "groups_sent": c.groups_sent}
                for ident, c in self._clients.items()
            }
        return stats

    def close(self) -> None:
        """Stop the I/O thread and close the socket, then the context (if it is ours)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._wake.wake()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._release()

    def _release(self) -> None:
        """Close the wake pipe and our context (any socket left open is closed without linger)."""
        self._wake.close()
        if self._own_context and not self._context.closed:
            self._context.destroy(linger=0)

    def __enter__(self) -> "GroupServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- I/O thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        socket = self._context.socket(zmq.ROUTER)
        try:
            configure(socket, self.max_message_bytes)
            socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
            socket.bind(self.bind)
            self.endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            socket.close(linger=0)
            self._start_error = OSError(f"generator service cannot bind {self.bind!r}: {exc}")
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(self._wake.read_fd, zmq.POLLIN)
        tick_ms = max(1, min(self.heartbeat_ms // 4, 250))
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(tick_ms))
                if self._wake.read_fd in events:
                    self._wake.drain()
                if socket in events:
                    self._receive_all(socket)
                self._dispatch(socket)
                self._heartbeat_and_reap(socket)
        finally:
            socket.close(linger=0)

    def _receive_all(self, socket: zmq.Socket) -> None:
        for _ in range(1000):
            try:
                frames = socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity, body = frames[0].bytes, frames[1:]
            self._handle(socket, identity, body)

    def _handle(self, socket: zmq.Socket, identity: bytes, body: list[Any]) -> None:
        now = monotonic()
        try:
            msg = decode(body, max_bytes=self.max_message_bytes)
        except ProtocolError as exc:
            with self._cond:
                self._stats.bad_messages += 1
            log.warning("bad message from client %s: %s", identity.hex()[:8], exc)
            self._send(socket, identity, Error(code=exc.code, message=exc.message))
            return
        with self._cond:
            client = self._clients.get(identity)
            if client is not None:
                client.last_seen = now
        if isinstance(msg, Hello):
            with self._cond:
                self._clients[identity] = ClientInfo(msg.client, msg.rank, msg.world_size, last_seen=now, last_sent=now)
            self._send(socket, identity, Welcome(self.service_id, self.generator_info, self.heartbeat_ms))
        elif isinstance(msg, Credit):
            if client is None:
                with self._cond:
                    self._stats.bad_messages += 1
                self._send(socket, identity, Error("bad_message", "credit from a client that sent no hello"))
                return
            with self._cond:
                client.credits += msg.n
        elif isinstance(msg, Bye):
            with self._cond:
                self._clients.pop(identity, None)
        elif isinstance(msg, Heartbeat):
            if client is None:
                with self._cond:
                    self._stats.bad_messages += 1
                self._send(socket, identity, Error("bad_message", "heartbeat from a client that sent no hello"))
            else:
                with self._cond:
                    self._stats.heartbeats_received += 1
        elif isinstance(msg, Error):
            log.warning("client %s reports error [%s] %s", identity.hex()[:8], msg.code, msg.message)
        else:
            with self._cond:
                self._stats.bad_messages += 1
            self._send(socket, identity, Error("bad_message", f"type {msg.TYPE!r} is not sent by trainers"))

    def _send(self, socket: zmq.Socket, identity: bytes, msg: Any) -> bool:
        try:
            send(socket, msg, identity=identity, max_bytes=self.max_message_bytes)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: peer gone; EAGAIN: peer's queue full
            log.debug("send to %s failed: %s", identity.hex()[:8], exc)
            return False
        with self._cond:
            client = self._clients.get(identity)
            if client is not None:
                client.last_sent = monotonic()
        return True

    def _dispatch(self, socket: zmq.Socket) -> None:
        """Send queued groups round-robin to clients with credit."""
        while True:
            with self._cond:
                if not self._queue:
                    return
                ready = [ident for ident, c in self._clients.items() if c.credits > 0]
                if not ready:
                    return
                # the client with the most credit left first: spreads groups evenly
                ident = max(ready, key=lambda i: (self._clients[i].credits, -self._clients[i].groups_sent))
                item = self._queue.popleft()
                self._cond.notify_all()
            frames = [ident, *item[1]]
            try:
                socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as exc:
                with self._cond:
                    self._queue.appendleft(item)  # not sent: keep it for someone else
                    if exc.errno == zmq.EHOSTUNREACH:
                        self._clients.pop(ident, None)
                        self._stats.dead_clients += 1
                    else:
                        self._clients[ident].credits = 0
                return
            with self._cond:
                client = self._clients.get(ident)
                if client is not None:
                    client.credits -= 1
                    client.groups_sent += 1
                    client.last_sent = monotonic()
                self._stats.groups_sent += 1
                self._stats.bytes_sent += sum(memoryview(f).nbytes for f in frames[1:])

    def _heartbeat_and_reap(self, socket: zmq.Socket) -> None:
        now = monotonic()
        interval = self.heartbeat_ms / 1000.0
        with self._cond:
            dead = [i for i, c in self._clients.items() if now - c.last_seen > DEAD_AFTER_HEARTBEATS * interval]
            for ident in dead:
                log.warning("client %s silent for > %d heartbeats: dropping its %d credits",
                            ident.hex()[:8], DEAD_AFTER_HEARTBEATS, self._clients[ident].credits)
                del self._clients[ident]
                self._stats.dead_clients += 1
            due = [i for i, c in self._clients.items() if now - c.last_sent >= interval]
        for ident in due:
            self._send(socket, ident, Heartbeat())
