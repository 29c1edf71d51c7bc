"""Trainer side of protocol v1: DEALER sockets that pull groups from one or more services.

One I/O thread owns every socket. ``start()`` connects and performs the hello/welcome handshake
with each endpoint, then grants ``credits`` to each. Every received group is passed to
``on_group`` on the I/O thread; when the callback returns, its credit is owed back to that service
(granted back in batches of a quarter of ``credits``). So at most ``credits`` groups per endpoint are ever in flight or waiting in the callback: memory
is bounded by credits. A service silent for more than three heartbeat intervals is reconnected
(a fresh socket, a new hello, credits granted again).

Every credit granted back names the last group handled (``ack``), which acknowledges it and
every group before it to the service (which re-sends the unacknowledged ones of a session that
ends), so a group can arrive twice across a reconnect: the receiver drops repeats by ``group_id``. Credits are clamped to the ``max_credit`` a service
announces. A group that cannot be used (refused by the codec, or ``on_group`` raises
``BadGroup``) is counted (``bad_groups``), answered with ``error`` and its credit granted back, so
no service can stop the stream with bad groups. A ``welcome`` that cannot be used stops ``start()``
with a ``ProtocolError`` naming the endpoint. An exception while handling one message is counted
and logged (rate-limited); if the I/O thread dies anyway, ``failed`` says why and ``check()`` raises
``ClientFailed``.

``send_feedback(caption_ids, scores)`` tells every service how much the trainer needs more of some
captions (``protocol.feedback``); the I/O thread sends the newest report (an unsent one is replaced).
``send_feedback(..., endpoint=url)`` tells that service alone (services of different generators number
different captions with the same ids): one report waits per service, a newer one replaces it.
A service that refuses the type (``error`` ``bad_message`` naming it unknown, or ``too_large`` for
a header over an older service's 4 KiB: services that predate feedback) gets no more of it, and
the client says so once per service; serving goes on.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import zmq

from .bounds import clip
from .codec import decode
from .errors import ERROR_CODES, BadGroup, ProtocolError
from .feedback import feedback_message, refuses_feedback
from .limits import DEAD_AFTER_HEARTBEATS, MAX_MESSAGE_BYTES
from .messages import Bye, Credit, Error, Feedback, Group, Heartbeat, Hello, Welcome
from infra.ratelog import RateLimitedLog
from .sockets import WakePipe, configure, monotonic, send

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_MS = 1000


class ClientFailed(RuntimeError):
    """The client's I/O thread died: no group arrives any more."""


@dataclass
class ClientStats:
    groups_received: int = 0
    bytes_received: int = 0
    callback_errors: int = 0
    bad_messages: int = 0
    handler_errors: int = 0
    reconnects: int = 0
    errors_from_service: int = 0
    bad_groups: int = 0  # groups refused (by the codec or by on_group's BadGroup): answered with error, credit given back
    feedback_sent: int = 0  # feedback messages sent, over all services
    feedback_replaced: int = 0  # reports replaced by a newer one before the I/O thread sent them
    feedback_refused: int = 0  # services that refused the feedback type: none is sent to them any more
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class _Endpoint:
    url: str
    socket: zmq.Socket
    welcome: Welcome | None = None
    outstanding: int = 0
    last_seen: float = 0.0
    last_sent: float = 0.0
    hello_sent: float = 0.0
    groups: int = 0
    credits: int = 0  # this endpoint's credit window (ours, clamped to its welcome.max_credit)
    last_group: float | None = None  # time.time() of the last group from this endpoint
    last_group_id: str = ""  # the last group handled in this session: the ack of the next credit
    feedback_sent: int = 0  # feedback messages sent to this service (over reconnects)
    feedback_refused: bool = False  # the service refused the feedback type: send it none (over reconnects)

    @property
    def heartbeat_s(self) -> float:
        return (self.welcome.heartbeat_ms if self.welcome else DEFAULT_HEARTBEAT_MS) / 1000.0


class GroupClient:
    """Receive caption groups from generator services.

    Args:
        endpoints: service endpoints, e.g. ``["tcp://127.0.0.1:5555"]``.
        on_group: called with each decoded ``Group`` (its raw ``images`` is a read-only view over
            the received frame: copy what you keep before returning).
        client_name, rank, world_size: sent in ``hello``.
        credits: groups each service may have in flight towards this client.
        connect_timeout: seconds ``start()`` waits for every welcome.
        curve: optional ``protocol.curve.CurveClient`` (keys) for services that require CURVE.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        on_group: Callable[[Group], None],
        client_name: str = "trainer",
        rank: int = 0,
        world_size: int = 1,
        credits: int = 8,
        connect_timeout: float = 10.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        context: zmq.Context | None = None,
        curve: Any = None,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ValueError("GroupClient needs at least one endpoint")
        if credits < 1:
            raise ValueError(f"credits must be >= 1, got {credits}")
        self.endpoints = list(endpoints)
        self.on_group = on_group
        self.hello = Hello(client=client_name, rank=rank, world_size=world_size)
        self.credits = int(credits)
        self.connect_timeout = float(connect_timeout)
        self.max_message_bytes = int(max_message_bytes)
        self.curve = curve
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._stats = ClientStats()
        self._lock = threading.Lock()
        self._wake = WakePipe()
        self._stop = threading.Event()
        self._handshake_done = threading.Event()
        self._fatal: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._endpoints: dict[str, _Endpoint] = {}
        # the newest report not yet sent, per service (None: to every service)
        self._feedback: dict[str | None, Feedback] = {}
        self._faults = RateLimitedLog(log, "group client: refused service input", 10.0)

    @property
    def welcomes(self) -> dict[str, Welcome]:
        with self._lock:
            return {url: ep.welcome for url, ep in self._endpoints.items() if ep.welcome is not None}

    def start(self) -> "GroupClient":
        """Connect and handshake with every endpoint; raise if one does not answer in time."""
        self._thread = threading.Thread(target=self._run, name="group-client-io", daemon=True)
        self._thread.start()
        finished = self._handshake_done.wait(self.connect_timeout)
        if self._fatal is not None:
            self.close()
            raise self._fatal
        if not finished:
            missing = [url for url in self.endpoints if url not in self.welcomes]
            self.close()
            hint = ("is stablerep-generator running and bound there, with --curve-keys of the same key directory? "
                    "a CURVE service refuses unknown keys without a word" if self.curve is not None else
                    "is stablerep-generator running and bound there? a service started with --curve-keys "
                    "answers only clients given the same --curve-keys")
            raise ConnectionError(
                f"no welcome from generator service {', '.join(missing)} within {self.connect_timeout:g} s ({hint})"
            )
        return self

    @property
    def failed(self) -> BaseException | None:
        """Why the I/O thread died (``None`` while it runs)."""
        return self._fatal

    def check(self) -> None:
        """Raise ``ClientFailed`` if the I/O thread died."""
        if self._fatal is not None:
            raise ClientFailed(f"group client I/O thread died: {type(self._fatal).__name__}: {clip(str(self._fatal))}") \
                from self._fatal

    def last_groups(self) -> dict[str, float | None]:
        """Per endpoint, the wall-clock time (``time.time()``) its last group arrived, or None."""
        with self._lock:
            return {url: ep.last_group for url, ep in self._endpoints.items()}

    def stats(self) -> ClientStats:
        with self._lock:
            stats = dataclasses.replace(self._stats)
            stats.endpoints = {
                url: {"welcomed": ep.welcome is not None, "credits_outstanding": ep.outstanding, "groups": ep.groups,
                      "last_group": ep.last_group, "feedback_sent": ep.feedback_sent, "feedback_refused": ep.feedback_refused}
                for url, ep in self._endpoints.items()
            }
        return stats

    def send_feedback(self, caption_ids: Sequence[Any], scores: Sequence[Any], endpoint: str | None = None) -> bool:
        """Tell the services how much more of each caption the trainer needs (``scores[i]`` >= 0 for
        ``caption_ids[i]``; higher: more). Sent by the I/O thread soon, replacing a report it has not
        sent yet. ``endpoint``: one of ``endpoints``, the only service told (its own report replaces only
        its own); None: every service. Returns False (nothing sent) once the service (None: every
        service) refused the type. Raises ``ValueError`` for an endpoint this client does not serve
        from, or a report no service would accept (see ``feedback_message``)."""
        if endpoint is not None and endpoint not in self.endpoints:
            raise ValueError(f"send_feedback: endpoint {endpoint!r} is not one of this client's "
                             f"{', '.join(self.endpoints)}")
        msg = feedback_message(caption_ids, scores)
        with self._lock:
            told = [ep for url, ep in self._endpoints.items() if endpoint is None or url == endpoint]
            if told and all(ep.feedback_refused for ep in told):
                return False
            if endpoint in self._feedback:
                self._stats.feedback_replaced += 1
            self._feedback[endpoint] = msg
        self._wake.wake()
        return True

    def close(self) -> None:
        """Say bye, close the sockets, then the context (if it is ours). Idempotent."""
        self._stop.set()
        self._wake.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._thread = None
        if self._own_context and not self._context.closed:
            self._context.destroy(linger=0)  # sockets are closed by the I/O thread; this catches any left
        self._wake.close()

    def __enter__(self) -> "GroupClient":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- I/O thread ---------------------------------------------------------------------------
    def _open(self, url: str) -> _Endpoint:
        socket = self._context.socket(zmq.DEALER)
        configure(socket, self.max_message_bytes)
        if self.curve is not None:
            self.curve.configure(socket)
        socket.connect(url)
        endpoint = _Endpoint(url=url, socket=socket)
        now = monotonic()
        endpoint.last_seen = now
        self._send(endpoint, self.hello)
        endpoint.hello_sent = now
        return endpoint

    def _send(self, endpoint: _Endpoint, msg: Any) -> None:
        try:
            send(endpoint.socket, msg, max_bytes=self.max_message_bytes)
            endpoint.last_sent = monotonic()
        except zmq.Again:
            log.debug("send to %s would block; dropped %s", endpoint.url, type(msg).__name__)

    def _run(self) -> None:
        poller = self._poller = zmq.Poller()
        poller.register(self._wake.read_fd, zmq.POLLIN)
        try:
            for url in self.endpoints:
                endpoint = self._open(url)
                with self._lock:
                    self._endpoints[url] = endpoint
                poller.register(endpoint.socket, zmq.POLLIN)
            while not self._stop.is_set():
                events = dict(poller.poll(50))
                if self._wake.read_fd in events:
                    self._wake.drain()
                for endpoint in list(self._endpoints.values()):
                    if endpoint.socket in events:
                        self._receive_all(endpoint)
                    if self._fatal is not None:
                        self._handshake_done.set()
                        return
                    self._keepalive(endpoint, poller)
                self._send_feedback()
                self._faults.flush()
        except BaseException as exc:  # never die silently: start() or the next stats() reader sees it
            log.exception("group client I/O thread failed")
            self._fatal = exc
            self._handshake_done.set()
        finally:
            for endpoint in self._endpoints.values():
                if endpoint.welcome is not None:
                    try:
                        self._send(endpoint, Bye(ack=endpoint.last_group_id))
                    except zmq.ZMQError:
                        pass
                endpoint.socket.close(linger=100)

    def _receive_all(self, endpoint: _Endpoint) -> None:
        """Handle at most 256 messages of one endpoint per loop turn (others and heartbeats go on)."""
        for _ in range(256):
            try:
                frames = endpoint.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            endpoint.last_seen = monotonic()
            try:
                msg = decode(frames, max_bytes=self.max_message_bytes)
            except ProtocolError as exc:
                with self._lock:
                    self._stats.bad_messages += 1
                self._faults.note(exc.code, f"{endpoint.url}: {clip(exc.message)}")
                self._send(endpoint, Error(code=exc.code, message=clip(exc.message)))
                if endpoint.welcome is None and (exc.code == "version" or exc.msg_type == "welcome"):
                    self._fatal = ProtocolError(exc.code, f"{endpoint.url} sent a welcome this trainer cannot use: "
                                                          f"{clip(exc.message)}")
                    return
                if exc.msg_type == "group" and endpoint.welcome is not None:
                    self._refused_group(endpoint)
                continue
            try:
                self._handle(endpoint, msg, frames)
            except zmq.ZMQError:
                raise  # the socket itself is broken: the I/O thread reports it
            except Exception as exc:  # one message must never stop the client
                with self._lock:
                    self._stats.handler_errors += 1
                self._faults.note("handler_error", f"{endpoint.url}: {type(exc).__name__}: {clip(str(exc))}")
            if self._endpoints.get(endpoint.url) is not endpoint:
                return  # reconnected: this socket is closed

    def _handle(self, endpoint: _Endpoint, msg: Any, frames: list[Any]) -> None:
        if isinstance(msg, Welcome):
            window = min(self.credits, msg.max_credit) if msg.max_credit > 0 else self.credits
            with self._lock:
                endpoint.welcome = msg
                endpoint.credits = window
            if self._handshake_done.is_set():  # a reconnect: its window right away
                self._grant_window(endpoint)
            elif all(ep.welcome is not None for ep in self._endpoints.values()) and len(self._endpoints) == len(self.endpoints):
                # Credits only once every service has answered: the receiver sizes its storage from all
                # the welcomes, and a group of one service must not wait for that in this thread while
                # another service's welcome waits unread behind it.
                for each in self._endpoints.values():
                    self._grant_window(each)
                self._handshake_done.set()
        elif isinstance(msg, Group):
            with self._lock:
                endpoint.outstanding -= 1
                endpoint.groups += 1
                endpoint.last_group = time.time()
                self._stats.groups_received += 1
                self._stats.bytes_received += sum(len(f) for f in frames[1:])
            try:
                self.on_group(msg)
            except BadGroup as exc:  # well-formed but unusable: skipped, and the service is told
                with self._lock:
                    self._stats.bad_groups += 1
                self._faults.note("bad_group", f"{endpoint.url}: {clip(str(exc))}")
                self._send(endpoint, Error("bad_message", clip(str(exc))))
            except Exception:
                with self._lock:
                    self._stats.callback_errors += 1
                log.exception("on_group failed for group %s from %s", msg.group_id, endpoint.url)
            endpoint.last_group_id = msg.group_id
            if endpoint.welcome is not None:
                self._replenish(endpoint)
        elif isinstance(msg, Error):
            with self._lock:
                self._stats.errors_from_service += 1
            # Kinds are the protocol's codes only, so made-up codes cannot defeat the rate limit.
            kind = msg.code if msg.code in ERROR_CODES else "other"
            self._faults.note(f"service_error:{kind}", f"{endpoint.url} reports [{clip(msg.code, 40)}] {clip(msg.message)}")
            if endpoint.welcome is None and msg.code == "version":
                self._fatal = ProtocolError("version", f"service {endpoint.url} refused our version: {msg.message}")
            elif endpoint.welcome is None and msg.code == "busy":
                self._fatal = ConnectionRefusedError(f"service {endpoint.url} refused us: {clip(msg.message)}")
            elif endpoint.feedback_sent and (refuses_feedback(msg.code, msg.message) or msg.code == "too_large"):
                self._feedback_refused(endpoint, msg)
            elif msg.code == "bad_message" and msg.message.startswith(f"{Feedback.TYPE}."):
                pass  # one report refused (a service with other bounds): the session goes on
            elif msg.code in ("credit_limit", "too_large", "busy"):
                pass  # the service clamped a grant or refused one message: the session goes on
            elif endpoint.welcome is not None and monotonic() - endpoint.hello_sent > endpoint.heartbeat_s:
                # The service no longer knows this session (it restarted, or declared us dead):
                # start a new one rather than talk past each other.
                self._reconnect(endpoint, self._poller)
        elif isinstance(msg, Heartbeat):
            pass
        else:
            with self._lock:
                self._stats.bad_messages += 1
            self._send(endpoint, Error("bad_message", f"type {msg.TYPE!r} is not sent by services"))

    def _send_feedback(self) -> None:
        """Send the newest reports: each to its service (or to every service), if welcomed and not refusing."""
        with self._lock:
            reports, self._feedback = self._feedback, {}
        for target, msg in reports.items():
            for url, endpoint in self._endpoints.items():
                if (target is None or url == target) and endpoint.welcome is not None and not endpoint.feedback_refused:
                    self._send(endpoint, msg)
                    with self._lock:
                        endpoint.feedback_sent += 1
                        self._stats.feedback_sent += 1

    def _feedback_refused(self, endpoint: _Endpoint, msg: Error) -> None:
        """The service takes no feedback (it predates the type): stop sending it any, and say so once."""
        with self._lock:
            if endpoint.feedback_refused:
                return
            endpoint.feedback_refused = True
            self._stats.feedback_refused += 1
        log.warning("generator service %s takes no feedback (it refused the type: [%s] %s); sending it none from now "
                    "on, its groups keep coming", endpoint.url, clip(msg.code, 40), clip(msg.message, 120))

    def _refused_group(self, endpoint: _Endpoint) -> None:
        """A ``group`` the codec refused still used one of our credits: give it back. It is
        acknowledged by the ack of the next group handled (its own id may be what was wrong)."""
        with self._lock:
            self._stats.bad_groups += 1
            endpoint.outstanding -= 1
        self._replenish(endpoint)

    def _grant_window(self, endpoint: _Endpoint) -> None:
        """Grant a welcomed service this client's whole credit window."""
        with self._lock:
            endpoint.outstanding = endpoint.credits
        self._send(endpoint, Credit(endpoint.credits))

    def _replenish(self, endpoint: _Endpoint) -> None:
        """Grant back consumed credits, batched: once a quarter of them (at least one) is used."""
        owed = endpoint.credits - endpoint.outstanding
        if owed >= max(1, endpoint.credits // 4):
            with self._lock:
                endpoint.outstanding += owed
            self._send(endpoint, Credit(owed, ack=endpoint.last_group_id))

    def _keepalive(self, endpoint: _Endpoint, poller: zmq.Poller) -> None:
        now = monotonic()
        interval = endpoint.heartbeat_s
        if endpoint.welcome is not None and now - endpoint.last_sent >= interval:
            self._send(endpoint, Heartbeat())
        silent_for = now - max(endpoint.last_seen, endpoint.hello_sent)
        if endpoint.welcome is not None and silent_for > DEAD_AFTER_HEARTBEATS * interval:
            log.warning("service %s silent for %.1f s: reconnecting", endpoint.url, silent_for)
            self._reconnect(endpoint, poller)
        elif endpoint.welcome is None and self._handshake_done.is_set() and silent_for > DEAD_AFTER_HEARTBEATS * interval:
            self._reconnect(endpoint, poller)  # still no welcome after a reconnect: try a fresh socket

    def _reconnect(self, endpoint: _Endpoint, poller: zmq.Poller) -> None:
        poller.unregister(endpoint.socket)
        endpoint.socket.close(linger=0)
        fresh = self._open(endpoint.url)
        fresh.groups = endpoint.groups
        fresh.last_group = endpoint.last_group
        fresh.feedback_sent, fresh.feedback_refused = endpoint.feedback_sent, endpoint.feedback_refused
        with self._lock:
            self._endpoints[endpoint.url] = fresh
            self._stats.reconnects += 1
        poller.register(fresh.socket, zmq.POLLIN)
