"""The service's answer to each message a trainer sends, session by session.

- ``hello`` opens a session (a second one on the same socket starts it afresh) and is answered
  ``welcome``; at ``max_clients`` an idle session is evicted for it, else it gets ``error`` code
  ``busy``. A peer that chose its own ZeroMQ routing id gets ``error`` code ``bad_message``
  (``protocol.routing_ids``).
- ``credit`` acknowledges up to its ``ack`` and grants credit, clamped at ``max_credit``
  outstanding (answered with ``error`` code ``credit_limit`` when clamped).
- ``bye`` acknowledges up to its ``ack`` and ends the session; ``heartbeat`` is counted;
  ``error`` is counted and logged.
- ``feedback`` (a welcomed client only) is merged into the service's ``FeedbackBoard`` within the
  client's ``FeedbackAllowance``; what comes faster is dropped and counted, not answered. Without a
  board the type is refused as unknown, word for word as a service that predates it.

Every refusal is counted and noted in the rate-limited fault log.
"""
from __future__ import annotations

from typing import Any

import zmq

from infra.ratelog import RateLimitedLog

from .bounds import clip
from .codec import decode
from .errors import ProtocolError
from .feedback import FeedbackAllowance, FeedbackBoard, refusal_of_feedback_type
from .limits import MAX_FEEDBACK_HEADER_BYTES
from .messages import Bye, Credit, Error, Feedback, Heartbeat, Hello, Welcome
from .routing_ids import GeneratedIds
from .server_dispatch import Dispatcher
from .server_state import ClientTable
from .sockets import monotonic


class SessionHandler:
    """Handles the messages a ``GroupServer``'s I/O thread receives.

    Args:
        table: the service's sessions and queue.
        dispatcher: sends the answers.
        faults: the rate-limited log of refused client input.
        welcome: the answer to an admitted ``hello``.
        generated_ids: tells a routing id the ROUTER generated from one a peer chose.
        max_message_bytes, max_client_header_bytes: limits of a trainer's message and its header
            (a ``feedback`` header may be up to ``MAX_FEEDBACK_HEADER_BYTES``).
        feedback: where ``feedback`` is merged; None: the type is refused as unknown.
        feedback_burst: feedback messages a client may send at once; then one per heartbeat interval.
    """

    def __init__(self, table: ClientTable, dispatcher: Dispatcher, faults: RateLimitedLog, welcome: Welcome,
                 generated_ids: GeneratedIds, max_message_bytes: int, max_client_header_bytes: int,
                 feedback: FeedbackBoard | None = None, feedback_burst: int = 1) -> None:
        self.table = table
        self.dispatcher = dispatcher
        self.faults = faults
        self.welcome = welcome
        self.generated_ids = generated_ids
        self.max_message_bytes = max_message_bytes
        self.max_client_header_bytes = max_client_header_bytes
        self.feedback = feedback
        self.feedback_burst = feedback_burst
        self.larger_headers = {Feedback.TYPE: MAX_FEEDBACK_HEADER_BYTES} if feedback is not None else None

    def refuse(self, socket: zmq.Socket, identity: bytes, code: str, message: str, kind: str = "bad_message") -> None:
        """Count and note a refused message and answer it with ``error`` ``code``."""
        with self.table.cond:
            self.table.stats.bad_messages += 1
        self.faults.note(kind, f"client {identity.hex()}: [{code}] {clip(message)}")
        self.dispatcher.send(socket, identity, Error(code, clip(message)))

    def handle(self, socket: zmq.Socket, identity: bytes, body: list[Any]) -> None:
        """Decode and answer one message (``body``: its frames) from the peer ``identity``."""
        table = self.table
        now = monotonic()
        try:
            msg = decode(body, max_bytes=self.max_message_bytes, max_header_bytes=self.max_client_header_bytes,
                         larger_headers=self.larger_headers)
        except ProtocolError as exc:
            self.refuse(socket, identity, exc.code, exc.message)
            return
        with table.cond:
            client = table.clients.get(identity)
            if client is not None:
                client.last_seen = now
        if isinstance(msg, Hello):
            self._hello(socket, identity, msg, now)
        elif isinstance(msg, Credit):
            if client is None:
                self.refuse(socket, identity, "bad_message", "credit from a client that sent no hello")
                return
            with table.cond:
                granted = table.grant(client, msg.n, msg.ack, now)
            if granted < msg.n:
                self.refuse(socket, identity, "credit_limit",
                            f"credit.n = {msg.n} clamped to {granted}: at most max_credit = {table.max_credit} "
                            "outstanding (credit plus unacknowledged groups)", kind="credit_limit")
        elif isinstance(msg, Bye):
            with table.cond:
                if client is not None:
                    table.acknowledge(client, msg.ack, now)
                    table.drop(identity, "left")
        elif isinstance(msg, Heartbeat):
            if client is None:
                self.refuse(socket, identity, "bad_message", "heartbeat from a client that sent no hello")
            else:
                with table.cond:
                    table.stats.heartbeats_received += 1
        elif isinstance(msg, Feedback):
            self._feedback(socket, identity, client, msg, now)
        elif isinstance(msg, Error):
            with table.cond:
                table.stats.client_errors += 1
            self.faults.note("client_error", f"client {identity.hex()} reports [{clip(msg.code, 40)}] {clip(msg.message)}")
        else:
            self.refuse(socket, identity, "bad_message", f"type {msg.TYPE!r} is not sent by trainers")

    def _hello(self, socket: zmq.Socket, identity: bytes, msg: Hello, now: float) -> None:
        if not self.generated_ids.generated(identity):
            self.refuse(socket, identity, "bad_message", "hello from a peer that set its own ZeroMQ routing id "
                        f"{clip(repr(identity), 60)}: connect without ZMQ_ROUTING_ID (groups queued to a broken "
                        "connection are lost, and a session under the same id would acknowledge them)")
            return
        with self.table.cond:
            admitted = self.table.admit(identity, msg.client, msg.rank, msg.world_size, now)
        if not admitted:
            max_clients = self.table.max_clients
            self.faults.note("busy", f"client {identity.hex()} refused: {max_clients} clients already")
            self.dispatcher.send(socket, identity, Error("busy", f"this service already serves max_clients = {max_clients} clients"))
            return
        self.dispatcher.send(socket, identity, self.welcome)

    def _feedback(self, socket: zmq.Socket, identity: bytes, client: Any, msg: Feedback, now: float) -> None:
        if self.feedback is None:
            self.refuse(socket, identity, "bad_message", refusal_of_feedback_type())
            return
        if client is None:
            self.refuse(socket, identity, "bad_message", "feedback from a client that sent no hello")
            return
        table = self.table
        with table.cond:
            if client.feedback_allowance is None:
                interval_s = self.dispatcher.heartbeat_ms / 1000.0
                client.feedback_allowance = FeedbackAllowance(self.feedback_burst, interval_s, now)
            if not client.feedback_allowance.take(now):
                table.stats.feedback_rate_limited += 1
                return
        unknown = self.feedback.merge(msg.caption_ids, msg.scores)
        with table.cond:
            table.stats.feedback_merged += 1
            table.stats.feedback_entries += len(msg.caption_ids) - unknown
            table.stats.feedback_unknown_ids += unknown
