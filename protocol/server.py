"""Service side of protocol v1: a ROUTER socket that hands groups to clients by credit.

One I/O thread owns the socket. Producers call ``put(group)``, which blocks while the bounded
queue is full (that wait is the generator's idle time). Each group goes to one client that has
credit, round-robin among such clients. Flow control cannot be gamed:

- a client holds at most ``max_credit`` (credit not yet used plus groups sent and not yet
  acknowledged); a grant above that is clamped and answered with ``error`` code ``credit_limit``;
- a grant's ``ack`` (the last group id the client received) acknowledges that group and the
  ones sent to that client before it (a grant without ``ack`` acknowledges nothing); the
  unacknowledged ones (at most ``max_credit`` and ``max_client_bytes``) go back to the front of
  the queue when the client leaves (``bye``), dies (silent for 3 heartbeats, judged only once
  every message that arrived was read, so a ``bye`` is never overtaken) or is unreachable, so a
  client's death loses nothing (delivery is at-least-once; trainers drop repeats by id); every
  re-queue is logged with its count;
- at most ``max_clients`` sessions; when full, a ``hello`` evicts the session that has held no
  unacknowledged group for longest, heartbeats or not, but never one that streams (holds
  unacknowledged groups, or received groups and holds credit); else it gets ``error`` code
  ``busy``; ZeroMQ holds at most ``send_hwm`` messages per peer;
- a session lives on a routing id the ROUTER generated for one connection: a ``hello`` from a
  peer that chose its own (``ZMQ_ROUTING_ID``, even one shaped like a generated id) gets ``error``
  code ``bad_message`` (``protocol.routing_ids``: a chosen id comes back after its connection
  breaks, ZeroMQ having dropped what was queued to the old one, and its next ``ack`` would
  acknowledge those groups); the ROUTER's id counter starts at a secret value, since libzmq
  aborts the process when it reaches an id a connected peer chose;
- every loop turn receives at most ``recv_batch`` messages (or ``slice_s`` seconds' worth), then
  sends, then heartbeats; trainer headers over ``max_client_header_bytes`` are refused unread.

An exception while handling one message is counted and logged (rate-limited) and the loop goes
on. Should the I/O thread die anyway, ``failed`` says why and ``put`` raises ``ServerFailed``.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Any

import zmq

from .bounds import clip
from .codec import decode, encode
from .errors import ProtocolError
from .generator_info import GeneratorInfo
from .limits import DEAD_AFTER_HEARTBEATS, MAX_HEADER_BYTES, MAX_MESSAGE_BYTES
from .messages import Bye, Credit, Error, Group, Heartbeat, Hello, Welcome
from infra.ratelog import RateLimitedLog
from .routing_ids import GeneratedIds, seed_routing_ids
from .server_state import ClientInfo, SentGroup, ServerStats, evictable
from .sockets import WakePipe, configure, monotonic, send

log = logging.getLogger(__name__)

#: Defaults of the service's limits (flags of ``stablerep-generator``).
DEFAULT_MAX_CREDIT = 256
DEFAULT_MAX_CLIENTS = 64
DEFAULT_MAX_CLIENT_BYTES = 512 * 2**20
#: Trainers send only tiny headers (hello is the largest, ~100 bytes).
MAX_CLIENT_HEADER_BYTES = 4096

class ServerFailed(RuntimeError):
    """The service's I/O thread died: nothing is served any more."""


class BindError(OSError):
    """The server cannot bind its endpoint (address in use, malformed, not this host's): bad input."""


class GroupServer:
    """Serve caption groups to trainer clients over a ROUTER socket.

    Args:
        bind: ZeroMQ endpoint, e.g. ``tcp://127.0.0.1:5555`` (``tcp://127.0.0.1:*`` picks a port;
            read it back from ``endpoint``).
        service_id: name sent in ``welcome``.
        generator_info: the generator description sent in ``welcome`` (a map is checked and converted).
        heartbeat_ms: heartbeat interval; a client silent for 3 intervals is dead.
        max_queue: groups held while no client has credit; ``put`` blocks beyond it.
        max_credit: most credit one client may hold (announced in ``welcome``).
        max_clients: most sessions at once.
        max_client_bytes: most bytes of sent, unacknowledged groups per client; also sizes the
            per-peer ZeroMQ send queue (``send_hwm`` messages of the generator's group size).
        recv_batch, slice_s: most messages / seconds of receiving per loop turn.
        curve: optional ``protocol.curve.CurveServer`` (keys and ZAP authenticator) to require.
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
        max_credit: int = DEFAULT_MAX_CREDIT,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        max_client_bytes: int = DEFAULT_MAX_CLIENT_BYTES,
        recv_batch: int = 64,
        slice_s: float = 0.01,
        max_client_header_bytes: int = MAX_CLIENT_HEADER_BYTES,
        log_interval_s: float = 10.0,
        curve: Any = None,
    ) -> None:
        for name, value in (("max_queue", max_queue), ("max_credit", max_credit), ("max_clients", max_clients),
                            ("max_client_bytes", max_client_bytes), ("recv_batch", recv_batch)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.bind = bind
        self.service_id = service_id
        self.generator_info = (
            generator_info if isinstance(generator_info, GeneratorInfo) else GeneratorInfo.from_wire(generator_info)
        )
        self.heartbeat_ms = int(heartbeat_ms)
        self.max_queue = int(max_queue)
        self.max_message_bytes = int(max_message_bytes)
        self.max_credit = int(max_credit)
        self.max_clients = int(max_clients)
        self.max_client_bytes = int(max_client_bytes)
        self.recv_batch = int(recv_batch)
        self.slice_s = float(slice_s)
        self.max_client_header_bytes = int(max_client_header_bytes)
        info = self.generator_info
        group_bytes = info.images_per_group * info.save_size * info.save_size * 3 + 1024
        #: ZeroMQ's per-peer send queue, in messages: what a client that stops reading can pin.
        self.send_hwm = max(4, min(self.max_credit + 16, self.max_client_bytes // group_bytes))
        self.curve = curve
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._queue: collections.deque[tuple[str, list[Any]]] = collections.deque()
        self._cond = threading.Condition()
        self._clients: dict[bytes, ClientInfo] = {}
        self._rr: collections.deque[bytes] = collections.deque()
        self._stats = ServerStats(queue_capacity=self.max_queue)
        self._faults = RateLimitedLog(log, "generator service: refused client input", log_interval_s)
        self._wake = WakePipe()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self._fatal: BaseException | None = None
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

    @property
    def failed(self) -> BaseException | None:
        """Why the I/O thread died (``None`` while it runs or after a clean ``close``)."""
        return self._fatal

    def check(self) -> None:
        """Raise ``ServerFailed`` if the I/O thread died."""
        if self._fatal is not None:
            raise ServerFailed(f"the generator service's I/O thread died: {type(self._fatal).__name__}: "
                               f"{clip(str(self._fatal))}") from self._fatal

    def put(self, group: Group, timeout: float | None = None) -> bool:
        """Queue a group for the next client with credit. Blocks while the queue is full.

        Returns False if ``timeout`` passed first or the server is closed. Raises
        ``ProtocolError`` at once for a group that cannot be encoded, ``ServerFailed`` if the
        I/O thread died.
        """
        self.check()
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
            self.check()
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
                f"{c.name}#{c.rank}@{ident.hex()}": {
                    "credits": c.credits, "groups_sent": c.groups_sent, "unacked": len(c.unacked),
                    "unacked_bytes": c.unacked_bytes,
                }
                for ident, c in self._clients.items()
            }
            stats.auth_refused = 0 if self.curve is None else self.curve.refused
            stats.failed = None if self._fatal is None else f"{type(self._fatal).__name__}: {clip(str(self._fatal))}"
        return stats

    def unacked(self) -> int:
        """Groups sent and not yet acknowledged, over all clients."""
        with self._cond:
            return sum(len(c.unacked) for c in self._clients.values())

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
        if self.curve is not None:
            self.curve.stop()
        if self._own_context and not self._context.closed:
            self._context.destroy(linger=0)

    def __enter__(self) -> "GroupServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- I/O thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        seed_routing_ids()  # before the ROUTER exists: its routing-id counter starts from rand()
        socket = self._context.socket(zmq.ROUTER)
        generated_ids: GeneratedIds | None = None
        try:
            configure(socket, self.max_message_bytes)
            # Trainers send headers only: ZeroMQ drops a connection that sends a bigger frame before
            # buffering it (a multipart message of many small frames is still buffered whole by libzmq).
            socket.setsockopt(zmq.MAXMSGSIZE, MAX_HEADER_BYTES)
            socket.setsockopt(zmq.SNDHWM, self.send_hwm)
            socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
            if self.curve is not None:
                self.curve.configure(self._context, socket)
            socket.bind(self.bind)
            self.endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
            generated_ids = self._generated_ids = GeneratedIds.learn(
                self._context, socket, in_process=self.endpoint.startswith("inproc://"))
        except (zmq.ZMQError, OSError, ValueError) as exc:
            if generated_ids is not None:
                generated_ids.close()
            socket.close(linger=0)
            self._start_error = BindError(f"cannot bind {self.bind!r}: {exc}")
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(self._wake.read_fd, zmq.POLLIN)
        tick_ms = max(1, min(self.heartbeat_ms // 4, 250))
        busy = False
        drained_at = monotonic()
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(0 if busy else tick_ms))
                if self._wake.read_fd in events:
                    self._wake.drain()
                more_in = self._receive_some(socket)  # a non-blocking try even without an event: see the reaper
                more_out = self._dispatch(socket)
                # A client is dead only if silent after everything that arrived was read: a bye (or
                # ack) waiting behind other messages is not overtaken by the reaper. Under a flood that
                # has not let the socket drain for a heartbeat interval, the reaper runs regardless.
                now = monotonic()
                if not more_in:
                    drained_at = now
                self._heartbeat_and_reap(socket, reap=not more_in or now - drained_at > self.heartbeat_ms / 1000.0)
                self._faults.flush()
                if self.curve is not None:
                    self.curve.flush_log()
                busy = more_in or more_out
        except BaseException as exc:  # never a silent zombie: put() and stats() report it
            log.critical("generator service I/O thread died: %s: %s", type(exc).__name__, clip(str(exc)), exc_info=True)
            with self._cond:
                self._fatal = exc
                self._cond.notify_all()
        finally:
            self._faults.flush(force=True)
            generated_ids.close()
            socket.close(linger=0)

    def _receive_some(self, socket: zmq.Socket) -> bool:
        """Handle at most ``recv_batch`` messages or ``slice_s`` seconds of them; True if more wait."""
        deadline = monotonic() + self.slice_s
        for _ in range(self.recv_batch):
            try:
                frames = socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False
            identity, body = frames[0].bytes, frames[1:]
            try:
                self._handle(socket, identity, body)
            except Exception as exc:  # one message must never stop the service
                with self._cond:
                    self._stats.handler_errors += 1
                self._faults.note("handler_error", f"client {identity.hex()}: {type(exc).__name__}: {clip(str(exc))}")
            if monotonic() > deadline:
                return True
        return True

    def _refuse(self, socket: zmq.Socket, identity: bytes, code: str, message: str, kind: str = "bad_message") -> None:
        with self._cond:
            self._stats.bad_messages += 1
        self._faults.note(kind, f"client {identity.hex()}: [{code}] {clip(message)}")
        self._send(socket, identity, Error(code, clip(message)))

    def _handle(self, socket: zmq.Socket, identity: bytes, body: list[Any]) -> None:
        now = monotonic()
        try:
            msg = decode(body, max_bytes=self.max_message_bytes, max_header_bytes=self.max_client_header_bytes)
        except ProtocolError as exc:
            self._refuse(socket, identity, exc.code, exc.message)
            return
        with self._cond:
            client = self._clients.get(identity)
            if client is not None:
                client.last_seen = now
        if isinstance(msg, Hello) and not self._generated_ids.generated(identity):
            self._refuse(socket, identity, "bad_message", "hello from a peer that set its own ZeroMQ routing id "
                         f"{clip(repr(identity), 60)}: connect without ZMQ_ROUTING_ID (groups queued to a broken "
                         "connection are lost, and a session under the same id would acknowledge them)")
            return
        if isinstance(msg, Hello):
            with self._cond:
                if client is None and len(self._clients) >= self.max_clients:
                    self._evict_idle()
                if client is None and len(self._clients) >= self.max_clients:
                    self._stats.refused_clients += 1
                    refused = True
                else:
                    refused = False
                    if client is not None:  # a second hello: a new session on the same socket
                        self._requeue(client, "sent a new hello")
                    else:
                        self._rr.append(identity)
                    self._clients[identity] = ClientInfo(msg.client, msg.rank, msg.world_size, last_seen=now, last_sent=now,
                                                         settled_at=now)
            if refused:
                self._faults.note("busy", f"client {identity.hex()} refused: {self.max_clients} clients already")
                self._send(socket, identity, Error("busy", f"this service already serves max_clients = {self.max_clients} clients"))
                return
            self._send(socket, identity, Welcome(self.service_id, self.generator_info, self.heartbeat_ms, self.max_credit))
        elif isinstance(msg, Credit):
            if client is None:
                self._refuse(socket, identity, "bad_message", "credit from a client that sent no hello")
                return
            with self._cond:
                self._acknowledge(client, msg.ack, now)
                room = self.max_credit - client.outstanding
                granted = max(0, min(msg.n, room))
                client.credits += granted
                clamped = granted < msg.n
                if clamped:
                    self._stats.credit_clamped += 1
            if clamped:
                self._refuse(socket, identity, "credit_limit",
                             f"credit.n = {msg.n} clamped to {granted}: at most max_credit = {self.max_credit} "
                             "outstanding (credit plus unacknowledged groups)", kind="credit_limit")
        elif isinstance(msg, Bye):
            with self._cond:
                if client is not None:
                    self._acknowledge(client, msg.ack, now)
                    self._drop(identity, "left")
        elif isinstance(msg, Heartbeat):
            if client is None:
                self._refuse(socket, identity, "bad_message", "heartbeat from a client that sent no hello")
            else:
                with self._cond:
                    self._stats.heartbeats_received += 1
        elif isinstance(msg, Error):
            with self._cond:
                self._stats.client_errors += 1
            self._faults.note("client_error", f"client {identity.hex()} reports [{clip(msg.code, 40)}] {clip(msg.message)}")
        else:
            self._refuse(socket, identity, "bad_message", f"type {msg.TYPE!r} is not sent by trainers")

    # --- bookkeeping (callers hold self._cond) --------------------------------------------------
    def _acknowledge(self, client: ClientInfo, ack: str, now: float) -> None:
        """``ack`` (a group id) acknowledges that group and all sent before it to this client; an
        empty or unknown id acknowledges nothing (counted in ``stats.unknown_acks``)."""
        acked = client.acknowledge(ack, now)
        if acked is None:
            self._stats.unknown_acks += 1
        else:
            self._stats.acked += acked

    def _requeue(self, client: ClientInfo, why: str) -> None:
        """Put a client's unacknowledged groups back at the front of the queue, oldest first (logged
        with their count: each may reach a trainer twice)."""
        count = len(client.unacked)
        if count:
            log.info("client %s#%d %s: re-queueing its %d unacknowledged group(s), %s .. %s", clip(client.name, 60),
                     client.rank, why, count, clip(client.unacked[0].group_id, 60), clip(client.unacked[-1].group_id, 60))
        while client.unacked:
            sent = client.unacked.pop()
            self._queue.appendleft((sent.group_id, sent.frames))
            self._stats.requeued += 1
        client.unacked_bytes = 0
        client.credits = 0

    def _evict_idle(self) -> None:
        """At ``max_clients``, make room for a new ``hello`` by dropping the session that has held no
        unacknowledged group for longest, heartbeats or not (``server_state.evictable``). So neither
        a storm of hellos nor sessions that only heartbeat can lock trainers out, and a trainer that
        streams is never evicted."""
        identity = evictable(self._clients)
        if identity is not None:
            self._drop(identity, "evicted")

    def _drop(self, identity: bytes, why: str) -> None:
        client = self._clients.pop(identity, None)
        if client is None:
            return
        self._requeue(client, {"left": "said bye", "evicted": "was evicted"}.get(why, "is gone (silent or unreachable)"))
        try:
            self._rr.remove(identity)
        except ValueError:
            pass
        if why == "left":
            self._stats.left_clients += 1
        elif why == "evicted":
            self._stats.evicted_clients += 1
        else:
            self._stats.dead_clients += 1

    def _send(self, socket: zmq.Socket, identity: bytes, msg: Any) -> bool:
        try:
            send(socket, msg, identity=identity, max_bytes=self.max_message_bytes)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: peer gone; EAGAIN: peer's queue full
            log.debug("send to %s failed: %s", identity.hex(), exc)
            return False
        with self._cond:
            client = self._clients.get(identity)
            if client is not None:
                client.last_sent = monotonic()
        return True

    def _next_client(self, now: float) -> bytes | None:
        """The next client in round-robin order that has credit, room and an unblocked pipe."""
        for _ in range(len(self._rr)):
            ident = self._rr[0]
            self._rr.rotate(-1)
            c = self._clients.get(ident)
            if (c is not None and c.credits > 0 and c.unacked_bytes < self.max_client_bytes and c.blocked_until <= now
                    and not c.unreachable):
                return ident
        return None

    def _dispatch(self, socket: zmq.Socket) -> bool:
        """Send queued groups round-robin to clients with credit (at most ``recv_batch`` per turn,
        or ``slice_s`` seconds); True if more could be sent at once."""
        deadline = monotonic() + self.slice_s
        for _ in range(self.recv_batch):
            now = monotonic()
            with self._cond:
                if not self._queue:
                    return False
                ident = self._next_client(now)
                if ident is None:
                    return False
                item = self._queue.popleft()
                self._cond.notify_all()
            frames = [ident, *item[1]]
            try:
                socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as exc:
                with self._cond:
                    self._queue.appendleft(item)  # not sent: keep it for someone else
                    if exc.errno == zmq.EHOSTUNREACH and ident in self._clients:
                        # Its connection is gone, but what it sent last (a bye, an ack) may still wait
                        # unread: the reaper drops it once every message that arrived was read.
                        self._clients[ident].unreachable = max(1, self._clients[ident].unreachable)
                    elif ident in self._clients:  # its pipe is full: skip it for a tick
                        self._clients[ident].blocked_until = now + max(0.001, self.heartbeat_ms / 4000.0)
                continue
            nbytes = sum(memoryview(f).nbytes for f in frames[1:])
            with self._cond:
                client = self._clients.get(ident)
                if client is not None:
                    client.credits -= 1
                    client.groups_sent += 1
                    client.last_sent = monotonic()
                    client.unacked.append(SentGroup(item[0], item[1], nbytes))
                    client.unacked_bytes += nbytes
                self._stats.groups_sent += 1
                self._stats.bytes_sent += nbytes
            if monotonic() > deadline:
                return True
        return True

    def _heartbeat_and_reap(self, socket: zmq.Socket, reap: bool = True) -> None:
        now = monotonic()
        interval = self.heartbeat_ms / 1000.0
        with self._cond:
            if reap:  # an unreachable client goes after one more drained receive: its last messages are read
                for c in self._clients.values():
                    c.unreachable += bool(c.unreachable)
            dead = [i for i, c in self._clients.items()
                    if reap and (c.unreachable > 2 or now - c.last_seen > DEAD_AFTER_HEARTBEATS * interval)]
            for ident in dead:
                c = self._clients[ident]
                if not c.unreachable:
                    log.warning("client %s#%d silent for > %d heartbeats: dropping its %d credits", clip(c.name, 60),
                                c.rank, DEAD_AFTER_HEARTBEATS, c.credits)
                self._drop(ident, "dead")
            due = [i for i, c in self._clients.items() if now - c.last_sent >= interval]
        for ident in due:
            self._send(socket, ident, Heartbeat())
