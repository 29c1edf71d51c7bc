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
  sends, then heartbeats; trainer headers over ``max_client_header_bytes`` are refused unread
  (but for a ``feedback`` header, which may be up to ``MAX_FEEDBACK_HEADER_BYTES``, checked once unpacked);
- ``feedback`` is merged into ``feedback`` (a ``protocol.feedback.FeedbackBoard``) at most
  ``feedback_burst`` at once and one per heartbeat interval per client; more is dropped and
  counted. A server without a board refuses the type as a service that predates it does.

An exception while handling one message is counted and logged (rate-limited) and the loop goes
on. Should the I/O thread die anyway, ``failed`` says why and ``put`` raises ``ServerFailed``.

This module holds the producer side and the I/O loop; the sessions' books are kept in
``protocol.server_state``, each client message is answered in ``protocol.server_sessions`` and
groups and heartbeats are sent (and silent clients reaped) in ``protocol.server_dispatch``.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any

import zmq

from infra.ratelog import RateLimitedLog

from .bounds import clip
from .codec import encode
from .feedback import DEFAULT_FEEDBACK_BURST, FeedbackBoard
from .generator_info import GeneratorInfo
from .limits import MAX_HEADER_BYTES, MAX_MESSAGE_BYTES
from .messages import Group, Welcome
from .routing_ids import GeneratedIds, seed_routing_ids
from .server_dispatch import Dispatcher
from .server_sessions import SessionHandler
from .server_state import ClientTable, ServerStats, log
from .sockets import WakePipe, configure, monotonic

__all__ = ["GroupServer", "ServerFailed", "BindError", "ServerStats", "DEFAULT_MAX_CREDIT", "DEFAULT_MAX_CLIENTS",
           "DEFAULT_MAX_CLIENT_BYTES", "MAX_CLIENT_HEADER_BYTES"]

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
        feedback: where clients' ``feedback`` is merged; None: the type is refused (``bad_message``).
        feedback_burst: feedback messages a client may send at once; then one per heartbeat interval.
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
        feedback: FeedbackBoard | None = None,
        feedback_burst: int = DEFAULT_FEEDBACK_BURST,
    ) -> None:
        for name, value in (("max_queue", max_queue), ("max_credit", max_credit), ("max_clients", max_clients),
                            ("max_client_bytes", max_client_bytes), ("recv_batch", recv_batch),
                            ("feedback_burst", feedback_burst)):
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
        self.feedback = feedback
        self.feedback_burst = int(feedback_burst)
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._table = ClientTable(self.max_queue, self.max_credit, self.max_clients, self.max_client_bytes)
        self._cond = self._table.cond  # one lock for the table and the producer's wait for room
        self._dispatcher = Dispatcher(self._table, self.max_message_bytes, self.recv_batch, self.slice_s, self.heartbeat_ms)
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
            while len(self._table.queue) >= self.max_queue and not self._stop.is_set():
                remaining = None if timeout is None else timeout - (monotonic() - start)
                if remaining is not None and remaining <= 0:
                    self._table.stats.put_wait_seconds += monotonic() - start
                    return False
                self._cond.wait(remaining if remaining is not None else 0.5)
            self._table.stats.put_wait_seconds += monotonic() - start
            self.check()
            if self._stop.is_set():
                return False
            self._table.queue.append((group.group_id, frames))
            # Without credit anywhere the I/O thread dispatches when credit arrives: no wake-up needed.
            dispatchable = any(client.credits > 0 for client in self._table.clients.values())
        if dispatchable:
            self._wake.wake()
        return True

    def stats(self) -> ServerStats:
        with self._cond:
            stats = dataclasses.replace(self._table.stats)
            stats.queue_depth = len(self._table.queue)
            stats.clients = {
                f"{c.name}#{c.rank}@{ident.hex()}": {
                    "credits": c.credits, "groups_sent": c.groups_sent, "unacked": len(c.unacked),
                    "unacked_bytes": c.unacked_bytes,
                }
                for ident, c in self._table.clients.items()
            }
            stats.auth_refused = 0 if self.curve is None else self.curve.refused
            stats.failed = None if self._fatal is None else f"{type(self._fatal).__name__}: {clip(str(self._fatal))}"
        return stats

    def unacked(self) -> int:
        """Groups sent and not yet acknowledged, over all clients."""
        with self._cond:
            return sum(len(c.unacked) for c in self._table.clients.values())

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
            generated_ids = GeneratedIds.learn(self._context, socket, in_process=self.endpoint.startswith("inproc://"))
        except (zmq.ZMQError, OSError, ValueError) as exc:
            if generated_ids is not None:
                generated_ids.close()
            socket.close(linger=0)
            self._start_error = BindError(f"cannot bind {self.bind!r}: {exc}")
            self._ready.set()
            return
        self._ready.set()
        sessions = SessionHandler(self._table, self._dispatcher, self._faults,
                                  Welcome(self.service_id, self.generator_info, self.heartbeat_ms, self.max_credit),
                                  generated_ids, self.max_message_bytes, self.max_client_header_bytes,
                                  self.feedback, self.feedback_burst)
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
                more_in = self._receive_some(socket, sessions)  # a non-blocking try even without an event: see the reaper
                more_out = self._dispatcher.dispatch(socket)
                # A client is dead only if silent after everything that arrived was read: a bye (or
                # ack) waiting behind other messages is not overtaken by the reaper. Under a flood that
                # has not let the socket drain for a heartbeat interval, the reaper runs regardless.
                now = monotonic()
                if not more_in:
                    drained_at = now
                self._dispatcher.heartbeat_and_reap(socket, reap=not more_in or now - drained_at > self.heartbeat_ms / 1000.0)
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

    def _receive_some(self, socket: zmq.Socket, sessions: SessionHandler) -> bool:
        """Handle at most ``recv_batch`` messages or ``slice_s`` seconds of them; True if more wait."""
        deadline = monotonic() + self.slice_s
        for _ in range(self.recv_batch):
            try:
                frames = socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False
            identity, body = frames[0].bytes, frames[1:]
            try:
                sessions.handle(socket, identity, body)
            except Exception as exc:  # one message must never stop the service
                with self._cond:
                    self._table.stats.handler_errors += 1
                self._faults.note("handler_error", f"client {identity.hex()}: {type(exc).__name__}: {clip(str(exc))}")
            if monotonic() > deadline:
                return True
        return True
