"""Which ROUTER routing ids the service generated itself, and a counter no peer can predict.

libzmq's ROUTER names the connection of a peer that sets no ``ZMQ_ROUTING_ID`` ``b"\\0"`` + a 4-byte
big-endian counter, incremented per connection, and takes the id a peer chose as given, checking it
only against ids in use. When the counter reaches an id a connected peer chose, libzmq inserts it
into its routing table without that check and asserts (``router.cpp`` ``identify_peer`` ->
``add_out_pipe``: ``zmq_assert (ok)``): the whole process aborts. libzmq starts the counter at
``rand()``, which it never seeds, so the first id of a process is ``00 6b 8b 45 67`` every time
(glibc's first ``rand()``) and the next one is anybody's guess to make.

Two defences, both here:

- ``seed_routing_ids()`` seeds the C library's ``rand()`` from the operating system's random source
  before the ROUTER is created, so the counter starts at a secret 32-bit value: to abort the service
  a peer must guess the id of a connection still to come (about one chance in 2**32 per connection
  it holds, per connection made). CurveZMQ (``--curve-keys``) closes even that: only authorized
  keys reach the routing table.
- ``GeneratedIds`` learns where the counter stands (an ``inproc`` probe connection right after
  ``bind``) and counts completed handshakes (a socket monitor); an id is one the ROUTER generated
  only when it has the generated shape *and* lies in the window of counter values handed out since.
  A peer that chose its own id, even a well-shaped one, gets no session (``protocol.server``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import secrets
import uuid

import zmq

log = logging.getLogger(__name__)

#: A generated routing id: ``b"\\0"`` + 4 bytes of counter (libzmq ``router.cpp``).
GENERATED_ID_BYTES = 5
_COUNTER = 1 << 32


def seed_routing_ids() -> bool:
    """Seed the C library's ``rand()`` (which libzmq uses for a ROUTER's first routing id) from
    ``secrets``; call it before creating the ROUTER. False where the C library is not reachable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.srand(ctypes.c_uint(secrets.randbits(32)))
    except (OSError, AttributeError) as exc:  # no C library to load: the ids stay libzmq's default
        log.warning("cannot seed the C library's rand() (%s): ROUTER routing ids stay predictable; "
                    "use --curve-keys on networks that untrusted peers reach", exc)
        return False
    return True


def counter_of(identity: bytes) -> int | None:
    """The counter value of a generated-looking id, or None for any other shape."""
    if len(identity) != GENERATED_ID_BYTES or identity[0] != 0:
        return None
    return int.from_bytes(identity[1:], "big")


class GeneratedIds:
    """Tell the routing ids a ROUTER generated from those its peers chose.

    ``learn(context, socket)`` right after ``bind`` (before any peer can have connected through
    another endpoint than this one's probe): it connects a probe over ``inproc``, reads the id the
    ROUTER gave it (the counter's value), and opens a monitor of completed handshakes. Every
    connection that completes its handshake afterwards takes at most one counter value, so the
    generated ids are the ``handshakes`` values after the probe's. ``close()`` the monitor with the socket.
    """

    def __init__(self, first: int, monitor: zmq.Socket, in_process: bool = False) -> None:
        self.first = first  # the probe's counter value
        self.handshakes = 0
        self.in_process = in_process  # inproc peers (no handshake, no monitor event): the shape decides
        self._monitor = monitor

    @classmethod
    def learn(cls, context: zmq.Context, socket: zmq.Socket, timeout_ms: int = 10000,
              in_process: bool = False) -> "GeneratedIds":
        probe_endpoint = f"inproc://stablerep-routing-probe-{uuid.uuid4().hex}"
        socket.bind(probe_endpoint)
        probe = context.socket(zmq.DEALER)
        try:
            probe.setsockopt(zmq.LINGER, 0)
            probe.connect(probe_endpoint)
            probe.send(b"")
            if not socket.poll(timeout_ms):
                raise OSError("the routing-id probe got no answer from the service's own socket")
            identity = socket.recv_multipart()[0]
        finally:
            probe.close(linger=0)
            socket.unbind(probe_endpoint)
        first = counter_of(identity)
        if first is None:
            raise OSError(f"the routing-id probe was named {identity.hex()}, not a generated id")
        monitor = socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        return cls(first, monitor, in_process)

    def _count_handshakes(self) -> None:
        while True:
            try:
                frames = self._monitor.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if frames and len(frames[0]) >= 2 and int.from_bytes(frames[0][:2], "little") == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshakes += 1

    def generated(self, identity: bytes) -> bool:
        """True if the ROUTER generated ``identity`` for a connection (a peer did not choose it)."""
        counter = counter_of(identity)
        if counter is None:
            return False
        if self.in_process:
            return True
        # A connection's handshake event is queued before its first message can be read.
        self._count_handshakes()
        offset = (counter - self.first) % _COUNTER
        return 1 <= offset <= self.handshakes

    def close(self) -> None:
        self._monitor.close(linger=0)
