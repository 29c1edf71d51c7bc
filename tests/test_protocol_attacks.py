"""Hostile and failing peers beside a good client, over real sockets on 127.0.0.1.

Each attack runs while a real ``GroupClient`` streams from the same ``GroupServer``. The checks
count groups (never time them): the good client gets what the bounds promise, the service stays
up (``check()``), a fresh client still gets ``welcome``, and what a peer may hold stays within
``max_credit`` / ``max_client_bytes`` / ``max_clients``. Groups/s before, during and after each
attack are measured by ``benchmarks/drills.py`` (docs/failure-and-security.md, "Drills").
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from benchmarks.drills import nested_header
from generator_service.config import GeneratorConfig
from protocol import Credit, Error, Group, Heartbeat, Hello, Welcome, decode, encode
from protocol.client import GroupClient
from protocol.server import GroupServer
from tests.polling import wait_for

REPO = Path(__file__).resolve().parents[1]
GENERATOR = GeneratorConfig(images_per_group=2, save_size=32).welcome_info()
HB_MS = 300
MAX_CREDIT = 16
SIDE = 32  # 2 x 32 x 32 x 3 = 6 KiB per group


def _group(i: int, side: int = SIDE) -> Group:
    return Group(group_id=f"g{i:06d}", caption_id=i, caption=f"caption {i}", seeds=[2 * i, 2 * i + 1],
                 images=np.full((2, side, side, 3), i % 256, np.uint8), generator="fp", gen_seconds=0.1)




class Collector:
    """The good client's callback: every group id, in arrival order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ids: list[str] = []

    def __call__(self, group: Group) -> None:
        with self.lock:
            self.ids.append(group.group_id)

    def __len__(self) -> int:
        with self.lock:
            return len(self.ids)


def _put(server: GroupServer, first: int, count: int, side: int = SIDE) -> None:
    for i in range(first, first + count):
        assert server.put(_group(i, side), timeout=60), "the queue stayed full for 60 s"


def _raw(context: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def _hello_answer(context: zmq.Context, endpoint: str, timeout_ms: int = 10000) -> object:
    """What a fresh raw client gets back for its hello (a Welcome, an Error, or None)."""
    sock = _raw(context, endpoint)
    try:
        sock.send_multipart(encode(Hello(client="fresh")))
        if not sock.poll(timeout_ms):
            return None
        return decode(sock.recv_multipart())
    finally:
        sock.close()


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def server():
    srv = GroupServer("tcp://127.0.0.1:*", "attacked", GENERATOR, heartbeat_ms=HB_MS, max_queue=64,
                      max_credit=MAX_CREDIT, max_clients=16, max_client_bytes=256 * 1024).start()
    yield srv
    srv.close()


def test_deeply_nested_messages_are_refused_and_nobody_stops_being_served(server, context):
    good = Collector()
    with GroupClient([server.endpoint], good, client_name="good", credits=8, connect_timeout=20):
        _put(server, 0, 50)
        attacker = _raw(context, server.endpoint)
        frames = [
            nested_header({"v": 1, "type": "credit"}, "n", 12),
            nested_header({"v": 1, "type": "credit"}, "n", 1000),
            nested_header({"v": 1, "type": "hello"}, "client", 4000),  # just under the 4 KiB trainer header limit
            msgpack.packb({"v": 1, "type": "hello", "client": {"a": {"b": {"c": {"d": {"e": {"f": {}}}}}}}}),
        ]
        for frame in frames * 25:
            attacker.send_multipart([frame])
        _put(server, 50, 50)
        wait_for(lambda: server.stats().bad_messages >= 100, "100 refusals")
        wait_for(lambda: len(good) == 100, "the good client's 100 groups")
        server.check()
        assert isinstance(_hello_answer(context, server.endpoint), Welcome)
        assert server.stats().handler_errors == 0
        attacker.close()
    assert sorted(good.ids) == [f"g{i:06d}" for i in range(100)]


def test_a_client_survives_nested_welcome_and_group_from_a_hostile_service(context):
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{port}"
    got = Collector()
    stop = threading.Event()

    def hostile_service() -> None:
        welcomed = False
        while not stop.is_set():
            if not router.poll(50):
                continue
            ident, *frames = router.recv_multipart()
            msg = decode(frames)
            if isinstance(msg, Hello) and not welcomed:
                router.send_multipart([ident, nested_header({"v": 1, "type": "welcome", "heartbeat_ms": 1000,
                                                       "generator": GENERATOR.to_wire()}, "service", 5000)])
                router.send_multipart([ident, *encode(Welcome("hostile", GENERATOR, 1000, 64))])
                welcomed = True
            elif isinstance(msg, Credit):
                deep = encode(_group(0))
                header = msgpack.unpackb(deep[0])
                router.send_multipart([ident, nested_header(header, "caption", 5000), *deep[1:]])
                router.send_multipart([ident, *encode(_group(1))])

    thread = threading.Thread(target=hostile_service, daemon=True)
    thread.start()
    try:
        with GroupClient([endpoint], got, credits=2, connect_timeout=20) as client:
            wait_for(lambda: len(got) >= 1, "the good group after the nested one")
            client.check()  # the I/O thread lives
            assert client.stats().bad_messages >= 2 and client.failed is None
        assert got.ids[0] == "g000001"
    finally:
        stop.set()
        thread.join(timeout=10)
        router.close()


def test_credit_hoarders_hold_at_most_max_credit_and_lose_nothing_when_they_vanish(server, context):
    """Four clients grant 2**20 credits, heartbeat, and never read nor acknowledge: each holds at
    most MAX_CREDIT groups; when they vanish those groups go to the good client."""
    good = Collector()
    hoarders = [_raw(context, server.endpoint) for _ in range(4)]
    alive = threading.Event()
    alive.set()

    def heartbeat() -> None:  # all the hoarders ever send after their grants (sockets are used by this thread only)
        for sock in hoarders:
            sock.send_multipart(encode(Hello(client="hoarder")))
            for _ in range(3):
                sock.send_multipart(encode(Credit(n=1 << 20)))
        while alive.is_set():
            for sock in hoarders:
                sock.send_multipart(encode(Heartbeat()))
            time.sleep(HB_MS / 3000)
        for sock in hoarders:
            sock.close()

    with GroupClient([server.endpoint], good, client_name="good", credits=8, connect_timeout=20):
        thread = threading.Thread(target=heartbeat, daemon=True)
        thread.start()
        try:
            wait_for(lambda: len(server.stats().clients) == 5 and server.stats().credit_clamped >= 12, "the clamps")
            produced = 400
            _put(server, 0, produced)
            wait_for(lambda: len(good) >= produced - 4 * MAX_CREDIT, "the good client's share")
            stats = server.stats()
            assert len(stats.clients) == 5  # the hoarders are alive: their groups are held, not lost
            for name, client in stats.clients.items():
                assert client["credits"] + client["unacked"] <= MAX_CREDIT, (name, client)
                assert client["unacked_bytes"] <= 256 * 1024
            assert isinstance(_hello_answer(context, server.endpoint), Welcome)
        finally:
            alive.clear()  # vanish: silent for 3 heartbeats, then dead; their groups are re-queued
            thread.join(timeout=10)
        wait_for(lambda: len(good) == produced, "every group, the hoarded ones re-queued")
        assert server.stats().dead_clients >= 4 and server.stats().requeued >= 1
    assert sorted(good.ids) == [f"g{i:06d}" for i in range(produced)]  # each exactly once


def test_clients_that_keep_granting_but_never_read_cannot_starve_a_good_one(server, context):
    """A grant acknowledges only up to the group id it names (``ack``), and a client that never
    reads knows no id: each of four such clients holds at most ``max_credit`` groups, and every
    other group goes to the good client."""
    good = Collector()
    greedy = []
    for _ in range(4):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 8)
        sock.connect(server.endpoint)
        greedy.append(sock)
    stop = threading.Event()

    def keep_granting() -> None:
        for sock in greedy:
            sock.send_multipart(encode(Hello(client="greedy")))
        while not stop.is_set():
            for sock in greedy:
                sock.send_multipart(encode(Credit(n=MAX_CREDIT)))
            stop.wait(0.02)

    side, phase = 64, 500  # 24 KiB groups
    with GroupClient([server.endpoint], good, client_name="good", credits=8, connect_timeout=20):
        thread = threading.Thread(target=keep_granting, daemon=True)
        thread.start()
        try:
            wait_for(lambda: len(server.stats().clients) == 5, "the greedy hellos")
            _put(server, 0, 2 * phase, side)

            def greedy_held() -> list[int]:
                return [c["unacked"] for key, c in server.stats().clients.items() if key.startswith("greedy#")]

            # every group is at the good client or held (unacknowledged) by a greedy one
            wait_for(lambda: len(good) + sum(greedy_held()) == 2 * phase, "every group accounted for")
            held = greedy_held()
            assert len(held) == 4 and all(n <= MAX_CREDIT for n in held)
            assert len(good) >= 2 * phase - 4 * MAX_CREDIT
            server.check()
            assert isinstance(_hello_answer(context, server.endpoint), Welcome)
        finally:
            stop.set()
            thread.join(timeout=10)
    for sock in greedy:
        sock.close()


@pytest.fixture
def default_heartbeat_server():
    """As ``server``, at the service's default heartbeat (1 s): the flood below, the good client and the
    service share one Python process, so a 300 ms heartbeat also measures this process's thread scheduling."""
    srv = GroupServer("tcp://127.0.0.1:*", "attacked", GENERATOR, heartbeat_ms=1000, max_queue=64,
                      max_credit=MAX_CREDIT, max_clients=16, max_client_bytes=256 * 1024).start()
    yield srv
    srv.close()


def test_a_flood_of_costly_hellos_does_not_stall_delivery(default_heartbeat_server, context):
    """3000 hellos near the 4 KiB trainer header limit (430 small maps) and 3000 just over it: the good
    client is never declared dead (delivery and heartbeats go on between receive slices)."""
    server = default_heartbeat_server
    good = Collector()
    costly = msgpack.packb({"v": 1, "type": "hello", "client": "flood",
                            "x": [{"a": [1, 2, 3]} for _ in range(430)]})
    assert 3000 < len(costly) <= 4096
    oversized = costly + b"\x00" * (4097 - len(costly))
    with GroupClient([server.endpoint], good, client_name="good", credits=8, connect_timeout=20) as client:
        flood = _raw(context, server.endpoint)
        _put(server, 0, 20)
        for i in range(3000):
            flood.send_multipart([costly])
            flood.send_multipart([oversized])
            if i % 300 == 0:
                _put(server, 20 + i // 300 * 10, 10)
        wait_for(lambda: len(good) == 120, "the good client's groups during the flood")
        wait_for(lambda: server.stats().bad_messages >= 3000, "the oversized hellos refused")
        stats = server.stats()
        assert stats.dead_clients == 0 and client.stats().reconnects == 0
        server.check()
        assert isinstance(_hello_answer(context, server.endpoint), Welcome)
        flood.close()


def test_a_reconnect_storm_cannot_lock_trainers_out(context):
    """At max_clients, a hello evicts the session that has held no unacknowledged group for longest,
    never one that streams: while two trainers stream, every storm hello gets ``busy``; once one
    leaves, each storm hello evicts the previous one and is welcomed, so a fresh trainer always gets in."""
    srv = GroupServer("tcp://127.0.0.1:*", "small", GENERATOR, heartbeat_ms=HB_MS, max_clients=2).start()
    try:
        good, other = Collector(), Collector()
        with GroupClient([srv.endpoint], good, client_name="good", credits=4, connect_timeout=20):
            second = GroupClient([srv.endpoint], other, client_name="second", credits=4, connect_timeout=20).start()
            try:
                _put(srv, 0, 10)
                wait_for(lambda: len(good) + len(other) == 10, "the trainers' groups")
                assert len(good) and len(other)
                for _ in range(20):  # both sessions stream: every storm hello is refused
                    answer = _hello_answer(context, srv.endpoint)
                    assert isinstance(answer, Error) and answer.code == "busy"
                assert srv.stats().refused_clients == 20 and srv.stats().evicted_clients == 0
            finally:
                second.close()  # says bye: one session frees
            wait_for(lambda: len(srv.stats().clients) == 1, "the second trainer's bye")
            for _ in range(20):  # half-open storm sessions evict one another
                assert isinstance(_hello_answer(context, srv.endpoint), Welcome)
            assert srv.stats().evicted_clients == 19
            fresh = Collector()
            with GroupClient([srv.endpoint], fresh, client_name="fresh", credits=4, connect_timeout=20):
                _put(srv, 10, 10)
                wait_for(lambda: len(good) + len(other) + len(fresh) == 20, "both trainers' groups")
                assert srv.stats().refused_clients == 20 and srv.stats().evicted_clients == 20
            assert sorted(good.ids + other.ids + fresh.ids) == [f"g{i:06d}" for i in range(20)]
    finally:
        srv.close()


VICTIM = """
import sys, zmq
from protocol import Credit, Group, Hello, decode, encode
sock = zmq.Context().socket(zmq.DEALER)
sock.connect(sys.argv[1])
sock.send_multipart(encode(Hello(client="victim")))
sock.send_multipart(encode(Credit(n=8)))
received = 0
while True:
    if isinstance(decode(sock.recv_multipart()), Group):
        received += 1
        if received == 8:
            print("holding 8", flush=True)
"""


def test_kill_9_of_a_client_mid_stream_loses_no_group(server):
    """A client in another process takes 8 groups and is killed with SIGKILL before acknowledging
    them: every group still reaches the surviving client or waits in the queue."""
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, server.endpoint], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        wait_for(lambda: len(server.stats().clients) == 1, "the victim's hello")
        _put(server, 0, 8)
        assert victim.stdout.readline().strip() == "holding 8"
        survivor = Collector()
        with GroupClient([server.endpoint], survivor, client_name="survivor", credits=4, connect_timeout=20):
            _put(server, 8, 40)
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
            wait_for(lambda: server.stats().dead_clients == 1, "the victim declared dead")
            wait_for(lambda: len(survivor) + server.stats().queue_depth == 48, "every group accounted for")
            wait_for(lambda: len(survivor) == 48, "every group at the survivor")
        assert server.stats().requeued >= 8
        assert sorted(survivor.ids) == [f"g{i:06d}" for i in range(48)]
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.stdout.close()


def test_an_ack_field_on_a_message_that_has_none_is_ignored_by_both_ends(server, context):
    """Only ``credit`` and ``bye`` carry ``ack``; on any other type it is an unknown field, ignored
    like any other, whatever its type: neither end stops, and neither reports a handler error."""
    raw = _raw(context, server.endpoint)
    hello = {"v": 1, "type": "hello", "client": "acker", "rank": 0, "world_size": 1, "ack": 5}
    raw.send_multipart([msgpack.packb(hello)])
    assert raw.poll(10000) and isinstance(decode(raw.recv_multipart()), Welcome)
    raw.send_multipart([msgpack.packb({"v": 1, "type": "heartbeat", "ack": None})])
    wait_for(lambda: server.stats().heartbeats_received == 1, "the heartbeat with an ack of None")
    assert server.stats().handler_errors == 0 and server.stats().bad_messages == 0
    raw.close()

    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    got = Collector()
    stop = threading.Event()

    def service() -> None:  # every message it sends carries an ack it has no business sending
        while not stop.is_set():
            if not router.poll(50):
                continue
            ident, *frames = router.recv_multipart()
            msg = decode(frames)
            if isinstance(msg, Hello):
                welcome = encode(Welcome("acking", GENERATOR, 1000, 8))
                router.send_multipart([ident, msgpack.packb({**msgpack.unpackb(welcome[0]), "ack": 7})])
            elif isinstance(msg, Credit) and not got.ids:
                router.send_multipart([ident, msgpack.packb({"v": 1, "type": "heartbeat", "ack": [1]})])
                group = encode(_group(3))
                router.send_multipart([ident, msgpack.packb({**msgpack.unpackb(group[0]), "ack": 3}), *group[1:]])

    thread = threading.Thread(target=service, daemon=True)
    thread.start()
    try:
        with GroupClient([f"tcp://127.0.0.1:{port}"], got, credits=2, connect_timeout=20) as client:
            wait_for(lambda: len(got) == 1, "the group that carries an ack")
            client.check()
            assert client.stats().handler_errors == 0 and client.stats().bad_messages == 0
        assert got.ids == ["g000003"]
    finally:
        stop.set()
        thread.join(timeout=10)
        router.close()


def test_a_peer_chosen_routing_id_is_refused_so_a_reconnect_cannot_acknowledge_lost_groups(context):
    """ZeroMQ drops what was queued to a connection that breaks; a peer that sets its own
    ZMQ_ROUTING_ID comes back under the same id, in the same session, and its next ack would
    acknowledge the groups lost with the first connection. The service answers a hello from a
    chosen id with ``bad_message``, so there is no such session: every group reaches the good client."""
    with GroupServer("tcp://127.0.0.1:*", "sticky", GENERATOR, heartbeat_ms=60000, max_credit=MAX_CREDIT) as server:
        _chosen_routing_id_checks(server, context)


def _chosen_routing_id_checks(server: GroupServer, context: zmq.Context) -> None:

    def ask(msg: object) -> tuple[zmq.Socket, object]:
        """Connect under the chosen id and send ``msg`` until something comes back. While the
        service still holds a connection under that id, ZeroMQ ignores a new one: try a fresh one."""
        replies: list = []

        def answered() -> bool:
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTING_ID, b"trainer-0")
            sock.connect(server.endpoint)
            sock.send_multipart(encode(msg))
            if sock.poll(200):
                replies.append((sock, decode(sock.recv_multipart())))
                return True
            sock.close()
            return False

        wait_for(answered, f"an answer to {type(msg).__name__}")
        return replies[0]

    first, answer = ask(Hello(client="sticky"))
    first.send_multipart(encode(Credit(n=4)))
    _put(server, 0, 5)
    wait_for(lambda: server.unacked() + server.stats().queue_depth == 5, "the five groups held or queued")
    first.close()  # whatever was sent to it and not read is gone with the connection
    again, reply = ask(Credit(n=1))
    if isinstance(reply, Group):  # the same session on a new connection: it acknowledges what it got
        again.send_multipart(encode(Credit(n=1, ack=reply.group_id)))
        wait_for(lambda: server.stats().acked + server.stats().unknown_acks >= 1, "the ack")
    again.close()
    assert server.stats().acked == 0, "groups never read were acknowledged"
    assert isinstance(answer, Error) and answer.code == "bad_message" and "routing id" in answer.message
    good = Collector()
    with GroupClient([server.endpoint], good, client_name="good", credits=4, connect_timeout=20):
        wait_for(lambda: len(good) == 5, "the five groups at the good client")
    assert sorted(good.ids) == [f"g{i:06d}" for i in range(5)]


def test_a_service_cannot_flood_the_client_log_with_made_up_error_codes(context):
    """Refusals are logged once per kind per interval; a service inventing a new error code per
    message gets them all counted under one kind, so neither the log nor the counters grow with them."""
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def service() -> None:
        while not stop.is_set():
            if not router.poll(50):
                continue
            ident, *frames = router.recv_multipart()
            if isinstance(decode(frames), Hello):
                router.send_multipart([ident, *encode(Welcome("inventive", GENERATOR, 60000, 8))])
                for i in range(500):
                    router.send_multipart([ident, msgpack.packb({"v": 1, "type": "error", "code": f"made-up-{i}",
                                                                 "message": "?"})])

    thread = threading.Thread(target=service, daemon=True)
    thread.start()
    try:
        with GroupClient([f"tcp://127.0.0.1:{port}"], lambda g: None, credits=2, connect_timeout=20) as client:
            wait_for(lambda: client.stats().errors_from_service == 500, "the 500 made-up errors")
            client.check()
            kinds = [kind for kind in client._faults.totals if kind.startswith("service_error")]
            assert kinds == ["service_error:other"] and client._faults.totals[kinds[0]] == 500
    finally:
        stop.set()
        thread.join(timeout=10)
        router.close()
