"""Squatted routing ids: libzmq aborts a ROUTER's process when its id counter reaches an id a
connected peer chose (``protocol.routing_ids``). Each service runs in its own process here, so
the abort is observed, not suffered."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import zmq

from protocol import Error, Hello, Welcome, decode, encode
from protocol.client import GroupClient
from tests.polling import wait_for

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
#: glibc's first rand() after no srand(): where libzmq starts the first ROUTER's counter unseeded.
UNSEEDED_FIRST = 0x6B8B4567

BARE_ROUTER = """
import sys, zmq
from protocol.routing_ids import counter_of, seed_routing_ids
if sys.argv[1] == "seeded":
    seed_routing_ids()
ctx = zmq.Context()
router = ctx.socket(zmq.ROUTER)
port = router.bind_to_random_port("tcp://127.0.0.1")
def connect(routing_id=None):
    sock = ctx.socket(zmq.DEALER)
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.connect(f"tcp://127.0.0.1:{port}")
    sock.send(b"x")
    return router.recv_multipart()[0]
first = counter_of(connect())
print(f"{first:08x}", flush=True)
if sys.argv[2] == "squat":
    connect(b"\\0" + (first + 1).to_bytes(4, "big"))  # a peer chooses the id the counter hands out next
    print("squatted", flush=True)
    connect()  # libzmq generates that id again: assertion, abort
    print("survived", flush=True)
"""


def _no_core_dump() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the abort below must leave no core file


def _bare_router(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BARE_ROUTER, *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=60, preexec_fn=_no_core_dump)


def test_seeded_counters_start_at_a_secret_value_in_every_process():
    firsts = {_bare_router("seeded", "-").stdout.strip() for _ in range(3)}
    assert len(firsts) == 3 and f"{UNSEEDED_FIRST:08x}" not in firsts


SERVICE = """
import sys
import numpy as np
from generator_service.config import GeneratorConfig
from protocol import Group
from protocol.server import GroupServer
info = GeneratorConfig(images_per_group=2, save_size=32).welcome_info()
with GroupServer("tcp://127.0.0.1:*", "squatted", info, heartbeat_ms=60000) as server:
    print(server.endpoint, flush=True)
    sent = 0
    for line in sys.stdin:
        for _ in range(int(line)):
            server.put(Group(group_id=f"g{sent:06d}", caption_id=sent, caption="c", seeds=[0, 1],
                             images=np.zeros((2, 32, 32, 3), np.uint8)), timeout=60)
            sent += 1
"""


def test_peers_squatting_the_predictable_ids_get_no_session_and_cannot_abort_the_service():
    """Squatters take the ids an unseeded service would hand out next (``00 6b8b4567`` on), each
    well shaped; their hellos are refused, a trainer then connects and streams, and the service
    process is still alive. Before the fix the trainer's connection aborted the service."""
    service = subprocess.Popen([sys.executable, "-c", SERVICE], cwd=REPO, env=ENV, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, preexec_fn=_no_core_dump)
    context = zmq.Context()
    try:
        endpoint = service.stdout.readline().strip()
        answers = []
        for k in range(16):
            squatter = context.socket(zmq.DEALER)
            squatter.setsockopt(zmq.LINGER, 0)
            squatter.setsockopt(zmq.ROUTING_ID, b"\0" + (UNSEEDED_FIRST + k).to_bytes(4, "big"))
            squatter.connect(endpoint)
            squatter.send_multipart(encode(Hello(client=f"squatter-{k}")))
            assert squatter.poll(30000), "a squatter got no answer"
            answers.append(decode(squatter.recv_multipart()))  # the squatter stays connected
        assert all(isinstance(a, Error) and a.code == "bad_message" and "routing id" in a.message for a in answers)
        got: list[str] = []
        with GroupClient([endpoint], lambda g: got.append(g.group_id), credits=4, connect_timeout=30) as client:
            assert isinstance(client.welcomes[endpoint], Welcome)
            service.stdin.write("5\n")
            service.stdin.flush()
            wait_for(lambda: len(got) == 5 or service.poll() is not None, "five groups (or the service's death)")
        assert service.poll() is None, f"the service died with {service.returncode}"
        assert got == [f"g{i:06d}" for i in range(5)]
    finally:
        context.destroy(linger=0)
        service.stdin.close()
        service.wait(timeout=30)
        service.stdout.close()


def test_an_in_process_service_still_welcomes_in_process_trainers():
    """inproc connections have no handshake (no monitor event): there the id's shape decides."""
    from generator_service.config import GeneratorConfig
    from protocol.server import GroupServer

    context = zmq.Context()
    try:
        info = GeneratorConfig(images_per_group=2, save_size=8).welcome_info()
        with GroupServer("inproc://in-process-service", "local", info, context=context):
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect("inproc://in-process-service")
            sock.send_multipart(encode(Hello(client="local")))
            assert sock.poll(30000) and isinstance(decode(sock.recv_multipart()), Welcome)
            sock.close()
    finally:
        context.term()
