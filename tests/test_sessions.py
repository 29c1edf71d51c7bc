"""Where sessions end, over real sockets: who is evicted at ``max_clients``, and a clean close that
must never pass for a death (whose groups would go to a second trainer)."""
from __future__ import annotations

import collections
import threading

import numpy as np
import pytest
import zmq

from generator_service.config import GeneratorConfig
from protocol import Credit, Error, Group, Heartbeat, Hello, Welcome, decode, encode
from protocol.client import GroupClient
from protocol.server import GroupServer
from tests.polling import wait_for

GENERATOR = GeneratorConfig(images_per_group=2, save_size=32).welcome_info()


def _group(i: int) -> Group:
    return Group(group_id=f"g{i:07d}", caption_id=i, caption=f"caption {i}", seeds=[0, 1],
                 images=np.zeros((2, 32, 32, 3), np.uint8))


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _session(context: zmq.Context, endpoint: str, name: str) -> tuple[zmq.Socket, object]:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send_multipart(encode(Hello(client=name)))
    assert sock.poll(30000), f"{name} got no answer"
    return sock, decode(sock.recv_multipart())


def _idle_sessions(context: zmq.Context, server: GroupServer, count: int) -> list[zmq.Socket]:
    """Sessions that grant credit and heartbeat but never get a group: the service has none."""
    socks = []
    for k in range(count):
        sock, answer = _session(context, server.endpoint, f"idle-{k}")
        assert isinstance(answer, Welcome)
        sock.send_multipart(encode(Credit(n=2)))
        socks.append(sock)
    return socks


def test_idle_heartbeating_sessions_at_the_limit_cannot_lock_a_reconnecting_trainer_out(context):
    """``max_clients`` sessions that only heartbeat (and hold credit) fill the service; each of 6
    hellos that follow is welcomed, evicting the session that has held no unacknowledged group for
    longest, heartbeats or not. Before, all 6 got ``busy``."""
    with GroupServer("tcp://127.0.0.1:*", "full", GENERATOR, heartbeat_ms=60000, max_clients=3) as server:
        idle = _idle_sessions(context, server, 3)
        beats = 0
        for attempt in range(6):
            for sock in idle:
                sock.send_multipart(encode(Heartbeat()))
            beats += len(idle)
            # read (or, once evicted, refused) before the next hello: every beat is counted one way or the other
            wait_for(lambda n=beats: server.stats().heartbeats_received + server.stats().bad_messages == n,
                     "the idle sessions' heartbeats")
            sock, answer = _session(context, server.endpoint, f"reconnecting-{attempt}")
            assert isinstance(answer, Welcome), f"attempt {attempt}: {answer}"
            sock.close()
        stats = server.stats()
        assert stats.refused_clients == 0 and stats.evicted_clients == 6 and len(stats.clients) == 3


def test_a_streaming_trainer_is_never_evicted(context):
    """A trainer that received groups and holds credit keeps its place through 12 hellos at the
    limit (they evict the idle sessions, then one another) and gets every group put meanwhile."""
    with GroupServer("tcp://127.0.0.1:*", "full", GENERATOR, heartbeat_ms=60000, max_clients=3) as server:
        got: list[str] = []
        with GroupClient([server.endpoint], lambda g: got.append(g.group_id), client_name="streaming",
                         credits=4, connect_timeout=30) as trainer:
            assert server.put(_group(0), timeout=30)
            wait_for(lambda: len(got) == 1, "the trainer's first group")
            _idle_sessions(context, server, 2)
            for attempt in range(12):
                sock, answer = _session(context, server.endpoint, f"storm-{attempt}")
                assert isinstance(answer, Welcome)
                sock.close()
                assert server.put(_group(attempt + 1), timeout=30)
            wait_for(lambda: len(got) == 13, "every group at the streaming trainer")
            assert trainer.stats().reconnects == 0 and trainer.stats().errors_from_service == 0
        assert server.stats().evicted_clients == 12
        assert got == [f"g{i:07d}" for i in range(13)]


def test_a_full_service_still_answers_busy_when_everyone_streams(context):
    with GroupServer("tcp://127.0.0.1:*", "full", GENERATOR, heartbeat_ms=60000, max_clients=1) as server:
        with GroupClient([server.endpoint], lambda g: None, credits=4, connect_timeout=30):
            assert server.put(_group(0), timeout=30)
            wait_for(lambda: server.stats().groups_sent == 1, "the group sent")
            _, answer = _session(context, server.endpoint, "late")
            assert isinstance(answer, Error) and answer.code == "busy"


def test_closes_racing_a_stream_never_pass_for_deaths_nor_deliver_a_group_twice():
    """100 trainers in turn take groups and close while another trainer streams from the same
    queue. Their connections break right after their ``bye``: the service must read that bye (and
    its ack) before it calls them gone. Every id is counted: none is delivered twice, none is lost.
    Before, 5-15 of 100 closes counted as deaths and 30-40 groups reached both trainers."""
    delivered: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def count(group: Group) -> None:
        with lock:
            delivered[group.group_id] += 1

    with GroupServer("tcp://127.0.0.1:*", "race", GENERATOR, heartbeat_ms=1000, max_queue=64) as server:
        put = 0
        with GroupClient([server.endpoint], count, client_name="stayer", credits=8, connect_timeout=30):
            for _ in range(100):
                took = threading.Semaphore(0)

                def closer(group: Group, took: threading.Semaphore = took) -> None:
                    count(group)
                    took.release()

                with GroupClient([server.endpoint], closer, client_name="closer", credits=8, connect_timeout=30):
                    for _ in range(12):
                        assert server.put(_group(put), timeout=30)
                        put += 1
                    assert took.acquire(timeout=30), "the closing trainer got no group"
            wait_for(lambda: len(delivered) == put, "every group delivered")
            wait_for(lambda: server.stats().left_clients + server.stats().dead_clients == 100, "every close seen")
            stats = server.stats()
        assert stats.dead_clients == 0 and stats.left_clients == 100
        assert sum(delivered.values()) == put == len(delivered), [g for g, n in delivered.items() if n > 1]


def test_a_frame_bigger_than_any_trainer_header_drops_its_connection_unread(context):
    """Trainers send headers only (64 KiB at most): ZeroMQ drops a connection that sends a bigger
    frame before buffering it, so it costs the service nothing and is never decoded; the next
    connection of the same socket is served."""
    with GroupServer("tcp://127.0.0.1:*", "guarded", GENERATOR, heartbeat_ms=60000) as server:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.endpoint)
        sock.send(b"\x81" + b"\0" * (1 << 20))  # 1 MiB: not read, the connection goes
        answers = []

        def hello_answered() -> bool:  # a hello sent on the dropped connection is lost with it: ask again
            sock.send_multipart(encode(Hello(client="after")))
            if sock.poll(200):
                answers.append(decode(sock.recv_multipart()))
            return bool(answers)

        wait_for(hello_answered, "an answer to a hello sent after the big frame")
        assert isinstance(answers[0], Welcome)
        assert server.stats().bad_messages == 0  # before: the frame was buffered, decoded and refused
