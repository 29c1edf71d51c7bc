"""GroupServer and GroupClient over real ZeroMQ sockets on 127.0.0.1."""
from __future__ import annotations

import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from generator_service.config import GeneratorConfig
from protocol import Bye, Credit, Error, Group, Hello, ProtocolError, Welcome, decode, encode
from protocol.client import GroupClient
from protocol.server import GroupServer
from tests.polling import wait_for

GENERATOR = GeneratorConfig(images_per_group=2, save_size=8).welcome_info()

HB_MS = 100


def _group(i: int) -> Group:
    return Group(group_id=f"g{i:04d}", caption_id=i, caption=f"caption {i}", seeds=[i, i + 1],
                 images=np.full((2, 4, 4, 3), i % 256, np.uint8), generator="fp", gen_seconds=0.1)




def _credits(server: GroupServer) -> int:
    return sum(client["credits"] for client in server.stats().clients.values())


@pytest.fixture
def server():
    srv = GroupServer("tcp://127.0.0.1:*", "test-svc", GENERATOR, heartbeat_ms=HB_MS, max_queue=100)
    srv.start()
    yield srv
    srv.close()


class RawPeer:
    """A bare DEALER speaking the protocol by hand, to observe exactly what the server sends."""

    def __init__(self, endpoint: str, ctx: zmq.Context):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, msg) -> None:
        self.sock.send_multipart(encode(msg), copy=False)

    def recv_all(self, wait: float = 0.3):
        out = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.sock.poll(20):
                out.append(decode(self.sock.recv_multipart(copy=False)))
        return out


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def test_round_trip_through_server_and_client(server):
    received: list[Group] = []
    with GroupClient([server.endpoint], lambda g: received.append(Group(**{**g.__dict__, "images": g.images.copy()})),
                     credits=4, connect_timeout=5) as client:
        assert client.welcomes[server.endpoint].generator == GENERATOR
        for i in range(30):
            assert server.put(_group(i), timeout=5)
        assert wait_for(lambda: len(received) == 30)
    assert [g.caption_id for g in received] == list(range(30))
    for g in received:
        np.testing.assert_array_equal(g.images, np.full((2, 4, 4, 3), g.caption_id, np.uint8))
        assert g.seeds == [g.caption_id, g.caption_id + 1]


def test_raw_client_never_gets_more_than_its_credits_and_two_clients_share(ctx):
    # a long heartbeat: the hand-driven peer sends none and must not be declared dead here
    server = GroupServer("tcp://127.0.0.1:*", "svc", GENERATOR, heartbeat_ms=5000).start()
    try:
        _credit_checks(server, ctx)
    finally:
        server.close()


def _credit_checks(server, ctx):
    raw = RawPeer(server.endpoint, ctx)
    raw.send(Hello(client="raw", rank=0, world_size=2))
    assert isinstance(raw.recv_all(0.3)[0], Welcome)
    raw.send(Credit(n=3))
    received: list[int] = []
    with GroupClient([server.endpoint], lambda g: received.append(g.caption_id), rank=1, world_size=2, credits=2,
                     connect_timeout=5):
        for i in range(40):
            server.put(_group(i), timeout=5)
        assert wait_for(lambda: len(received) == 37)
        groups = [m for m in raw.recv_all(0.5) if isinstance(m, Group)]
        assert len(groups) == 3  # exactly its credits, though 37 more groups went by
        raw.send(Credit(n=1))
        server.put(_group(99), timeout=5)
        late = [m for m in raw.recv_all(0.5) if isinstance(m, Group)]
        assert len(late) + (99 in received) == 1
    ids = sorted([g.caption_id for g in groups] + [g.caption_id for g in late] + received)
    assert ids == list(range(40)) + [99]  # each group to exactly one client


def test_a_credit_acknowledges_only_up_to_the_group_it_names(ctx):
    server = GroupServer("tcp://127.0.0.1:*", "svc", GENERATOR, heartbeat_ms=5000, max_credit=8).start()
    try:
        raw = RawPeer(server.endpoint, ctx)
        raw.send(Hello(client="raw", rank=0, world_size=1))
        assert isinstance(raw.recv_all(0.3)[0], Welcome)
        raw.send(Credit(n=4))
        for i in range(4):
            server.put(_group(i), timeout=5)
        groups = []
        assert wait_for(lambda: groups.extend(m for m in raw.recv_all(0.05) if isinstance(m, Group)) or len(groups) == 4)
        raw.send(Credit(n=5))  # no ack: nothing acknowledged, so the grant is clamped to 8 - 4 unacked
        assert wait_for(lambda: server.stats().credit_clamped == 1)
        assert server.stats().acked == 0 and server.unacked() == 4
        raw.send(Credit(n=1, ack="g9999"))  # an id this client never got: nothing acknowledged
        assert wait_for(lambda: server.stats().unknown_acks == 1)
        assert server.unacked() == 4
        raw.send(Credit(n=1, ack=groups[1].group_id))  # the second group and the one before it
        assert wait_for(lambda: server.stats().acked == 2)
        assert server.unacked() == 2
        raw.send(Bye(ack=groups[2].group_id))  # leaves having received the third: only the fourth goes back
        assert wait_for(lambda: server.stats().left_clients == 1)
        stats = server.stats()
        assert stats.acked == 3 and stats.requeued == 1 and stats.queue_depth == 1
    finally:
        server.close()


def test_silent_client_is_declared_dead_and_loses_no_queued_group(server, ctx):
    raw = RawPeer(server.endpoint, ctx)
    raw.send(Hello(client="silent", rank=0, world_size=1))
    raw.recv_all(0.1)
    raw.send(Credit(n=5))
    assert wait_for(lambda: _credits(server) == 5)
    assert wait_for(lambda: server.stats().dead_clients == 1, timeout=3 * HB_MS / 1000 + 2)
    assert _credits(server) == 0 and server.stats().clients == {}
    for i in range(6):
        server.put(_group(i), timeout=5)
    assert server.stats().queue_depth == 6  # nobody to send to: every group still queued
    received = []
    with GroupClient([server.endpoint], lambda g: received.append(g.caption_id), credits=8, connect_timeout=5):
        assert wait_for(lambda: len(received) == 6)
    assert received == list(range(6))


def test_garbage_gets_error_and_everyone_keeps_being_served(server, ctx):
    a, b = [], []
    with GroupClient([server.endpoint], lambda g: a.append(g.caption_id), credits=2, connect_timeout=5), \
            GroupClient([server.endpoint], lambda g: b.append(g.caption_id), credits=2, connect_timeout=5):
        bad = RawPeer(server.endpoint, ctx)
        bad.sock.send_multipart([b"\xc1garbage"])
        bad.sock.send_multipart([msgpack.packb({"v": 9, "type": "hello"})])
        bad.sock.send_multipart([msgpack.packb({"v": 1, "type": "credit", "n": "lots"})])
        bad.send(Credit(n=1))  # credit before hello
        errors = [m for m in bad.recv_all(0.5) if isinstance(m, Error)]
        assert [e.code for e in errors] == ["bad_message", "version", "bad_message", "bad_message"]
        assert "n" in errors[2].message
        # the garbage sender itself is still served once it behaves
        bad.send(Hello(client="reformed", rank=0, world_size=1))
        bad.send(Credit(n=1))
        for i in range(21):
            server.put(_group(i), timeout=5)
        reformed = []
        deadline = time.monotonic() + 5
        while len(a) + len(b) + len(reformed) < 21 and time.monotonic() < deadline:
            reformed += [m.caption_id for m in bad.recv_all(0.1) if isinstance(m, Group)]
        assert len(a) > 0 and len(b) > 0 and len(reformed) == 1
        assert sorted(a + b + reformed) == list(range(21))
    assert server.stats().bad_messages >= 4


def test_oversized_message_is_refused_and_server_survives(ctx):
    srv = GroupServer("tcp://127.0.0.1:*", "svc", GENERATOR, heartbeat_ms=HB_MS, max_message_bytes=64 * 1024).start()
    try:
        big = RawPeer(srv.endpoint, ctx)
        big.sock.send_multipart([msgpack.packb({"v": 1, "type": "heartbeat"}), bytes(256 * 1024)])
        got = []
        with GroupClient([srv.endpoint], lambda g: got.append(g.caption_id), connect_timeout=5,
                         max_message_bytes=64 * 1024):
            srv.put(_group(1), timeout=5)
            assert wait_for(lambda: got == [1])
    finally:
        srv.close()


def test_client_connect_timeout_names_endpoint():
    with pytest.raises(ConnectionError, match="tcp://127.0.0.1:1"):
        GroupClient(["tcp://127.0.0.1:1"], lambda g: None, connect_timeout=0.3).start()


def test_client_reports_version_refusal(ctx):
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def fake_service():
        if router.poll(3000):
            ident, *_ = router.recv_multipart()
            router.send_multipart([ident, msgpack.packb({"v": 2, "type": "welcome"})])

    thread = threading.Thread(target=fake_service)
    thread.start()
    with pytest.raises(ProtocolError) as info:
        GroupClient([f"tcp://127.0.0.1:{port}"], lambda g: None, connect_timeout=3).start()
    thread.join()
    router.close()
    assert info.value.code == "version" and f"{port}" in info.value.message


def test_client_sends_heartbeats_and_reconnects_after_service_restart(ctx):
    srv = GroupServer("tcp://127.0.0.1:*", "svc-a", GENERATOR, heartbeat_ms=HB_MS).start()
    endpoint = srv.endpoint
    got = []
    client = GroupClient([endpoint], lambda g: got.append(g.caption_id), credits=3, connect_timeout=5).start()
    try:
        # More than 3 intervals pass (5 heartbeats arrive): the heartbeats keep the client alive.
        assert wait_for(lambda: srv.stats().heartbeats_received >= 5, timeout=30)
        assert srv.stats().dead_clients == 0 and len(srv.stats().clients) == 1
        srv.put(_group(1), timeout=5)
        assert wait_for(lambda: got == [1])
        srv.close()
        srv = GroupServer(endpoint, "svc-b", GENERATOR, heartbeat_ms=HB_MS).start()
        srv.put(_group(2), timeout=5)
        assert wait_for(lambda: got == [1, 2], timeout=10)
        assert client.stats().reconnects >= 1
        assert client.welcomes[endpoint].service == "svc-b"
    finally:
        client.close()
        srv.close()


def test_put_blocks_when_queue_full_and_countswait_for():
    srv = GroupServer("tcp://127.0.0.1:*", "svc", GENERATOR, max_queue=2).start()
    try:
        assert srv.put(_group(0), timeout=1) and srv.put(_group(1), timeout=1)
        assert not srv.put(_group(2), timeout=0.2)  # nobody takes groups: the full queue refuses it
        assert srv.stats().put_wait_seconds > 0 and srv.stats().queue_depth == 2
    finally:
        srv.close()


def test_bind_error_is_clear():
    srv = GroupServer("tcp://127.0.0.1:*", "svc", GENERATOR).start()
    try:
        with pytest.raises(OSError, match="cannot bind"):
            GroupServer(srv.endpoint, "svc2", GENERATOR).start()
    finally:
        srv.close()
