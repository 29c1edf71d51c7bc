"""Transport throughput of one caption group: protocol v1 vs bare pyzmq vs pickle.

A sender process streams ``groups`` copies of a uint8 group (default 10x256x256x3, as the paper's
10 images per caption saved at 256 px) to a receiver in this process, over tcp loopback and ipc,
three ways in one run:

- ``protocol``: GroupServer -> GroupClient, credit flow control, header encode/decode, and the
  receiver copies each group into a preallocated ring buffer (what the replay buffer does).
- ``bare``: pyzmq PUSH/PULL, the image bytes as one zero-copy frame, no header, no copy at the
  receiver (the transport's ceiling).
- ``bare+copy``: the same, plus the receiver's one copy into a preallocated ring buffer, so the
  cost of the protocol itself (header, credits, heartbeats) can be read off against it.
- ``pickle``: pyzmq ``send_pyobj``/``recv_pyobj`` of the numpy array.

On a small machine the sender's and receiver's ZeroMQ I/O threads and the receiver's copy compete
for the same cores, so the receiver's copy (which ``bare`` skips) is visible in the ratio.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import threading
import time
import uuid
from typing import Any

import numpy as np
import zmq

from generator_service.config import GeneratorConfig
from protocol import Group
from protocol.client import GroupClient
from protocol.server import GroupServer

METHODS = ("protocol", "bare", "bare+copy", "pickle")
RUN_TIMEOUT_S = 120.0
SETTLE_S = 0.5  # pause between runs so the previous sender has exited and freed its memory


def _payload(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)


def _serve_protocol(endpoint: str, shape: tuple[int, ...], groups: int, ready: Any, received: Any) -> None:
    images = _payload(shape)
    m, side = shape[0], shape[1]
    info = GeneratorConfig(backend="procedural", images_per_group=m, save_size=side).welcome_info()
    server = GroupServer(endpoint, "bench", info, max_queue=32).start()
    ready.put(server.endpoint)
    for i in range(groups):
        server.put(Group(group_id=f"b{i}", caption_id=i, caption="bench", seeds=list(range(shape[0])), images=images))
    received.wait(RUN_TIMEOUT_S)  # closing earlier could drop groups still in flight
    server.close()


def _serve_bare(endpoint: str, shape: tuple[int, ...], groups: int, ready: Any, received: Any, use_pickle: bool) -> None:
    images = _payload(shape)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 16)
    sock.bind(endpoint)
    ready.put(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    for _ in range(groups):
        if use_pickle:
            sock.send_pyobj(images)
        else:
            sock.send(memoryview(images).cast("B"), copy=False)
    # A peer that disconnects while the receiver's queue is full loses what is still in flight:
    # stay connected until the receiver has everything.
    received.wait(RUN_TIMEOUT_S)
    ctx.destroy(linger=0)


def _endpoint(transport: str, tag: str) -> str:
    """A fresh endpoint per run: tcp on a port the sender picks, ipc on a path never used before."""
    if transport == "tcp":
        return "tcp://127.0.0.1:*"
    return f"ipc://{tempfile.gettempdir()}/stablerep-bench-{os.getpid()}-{tag}-{uuid.uuid4().hex[:8]}.sock"


def measure(method: str, transport: str, shape: tuple[int, ...], groups: int) -> dict[str, float]:
    """Time ``groups`` transfers of one method over one transport; warm-up excluded."""
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    received = ctx.Event()
    endpoint = _endpoint(transport, method.replace("+", "-"))
    warmup = max(2, groups // 10)
    total = groups + warmup
    if method == "protocol":
        proc = ctx.Process(target=_serve_protocol, args=(endpoint, shape, total, ready, received), daemon=True)
    else:
        proc = ctx.Process(target=_serve_bare, args=(endpoint, shape, total, ready, received, method == "pickle"),
                           daemon=True)
    proc.start()
    try:
        endpoint = ready.get(timeout=60)
        if method == "protocol":
            elapsed = _receive_protocol_after_warmup(endpoint, shape, warmup, groups)
        else:
            elapsed = _receive_bare_after_warmup(endpoint, shape, warmup, groups, method == "pickle",
                                                 copy_into_ring=method == "bare+copy")
    finally:
        received.set()
        proc.join(timeout=30)
    nbytes = int(np.prod(shape)) * groups
    return {"seconds": elapsed, "groups_per_s": groups / elapsed, "gb_per_s": nbytes / elapsed / 1e9}


def _receive_protocol_after_warmup(endpoint: str, shape: tuple[int, ...], warmup: int, groups: int) -> float:
    ring = np.empty((8, *shape), dtype=np.uint8)
    state = {"count": 0, "start": 0.0, "end": 0.0}
    finished = threading.Event()  # the main thread sleeps on it: no polling loop competing for a core

    def on_group(group: Group) -> None:
        np.copyto(ring[state["count"] % len(ring)], group.images)
        state["count"] += 1
        if state["count"] == warmup:
            state["start"] = time.perf_counter()
        elif state["count"] == warmup + groups:
            state["end"] = time.perf_counter()
            finished.set()

    client = GroupClient([endpoint], on_group, credits=16, connect_timeout=30).start()
    if not finished.wait(RUN_TIMEOUT_S):
        client.close()
        raise TimeoutError(f"protocol run over {endpoint} received {state['count']} of {warmup + groups} groups "
                           f"in {RUN_TIMEOUT_S} s")
    client.close()
    return state["end"] - state["start"]


def _receive_bare_after_warmup(endpoint: str, shape: tuple[int, ...], warmup: int, groups: int, use_pickle: bool,
                               copy_into_ring: bool = False) -> float:
    ring = np.empty((8, int(np.prod(shape))), dtype=np.uint8)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 16)
    sock.setsockopt(zmq.RCVTIMEO, int(RUN_TIMEOUT_S * 1000))  # zmq.Again instead of hanging forever
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    nbytes = int(np.prod(shape))
    start = 0.0
    try:
        for i in range(warmup + groups):
            if i == warmup:
                start = time.perf_counter()
            if use_pickle:
                got = sock.recv_pyobj().nbytes
            else:
                frame = sock.recv(copy=False)
                got = len(frame)
                if copy_into_ring:
                    np.copyto(ring[i % len(ring)], np.frombuffer(frame.buffer, dtype=np.uint8))
            if got != nbytes:
                raise RuntimeError(f"received {got} bytes, expected {nbytes}")
        return time.perf_counter() - start
    finally:
        ctx.destroy(linger=0)


def run_protocol_bench(
    shape: tuple[int, ...] = (10, 256, 256, 3),
    groups: int = 200,
    transports: tuple[str, ...] = ("tcp", "ipc"),
    repeats: int = 3,
) -> dict[str, Any]:
    """Best of ``repeats`` for each (transport, method), plus the ratios the goals are stated in."""
    results: dict[str, Any] = {"shape": list(shape), "groups": groups, "repeats": repeats, "transports": {}}
    for transport in transports:
        per_method: dict[str, dict[str, float]] = {}
        for repeat in range(repeats):
            # Interleave methods so machine noise hits all alike, and rotate their order: the run
            # right after another one's teardown is measurably slower on a small machine.
            for method in METHODS[repeat % len(METHODS):] + METHODS[:repeat % len(METHODS)]:
                time.sleep(SETTLE_S)
                run = measure(method, transport, shape, groups)
                best = per_method.get(method)
                if best is None or run["gb_per_s"] > best["gb_per_s"]:
                    per_method[method] = run
        per_method_ratios = {
            "protocol_vs_bare": per_method["protocol"]["gb_per_s"] / per_method["bare"]["gb_per_s"],
            "protocol_vs_bare_copy": per_method["protocol"]["gb_per_s"] / per_method["bare+copy"]["gb_per_s"],
            "protocol_vs_pickle": per_method["protocol"]["gb_per_s"] / per_method["pickle"]["gb_per_s"],
        }
        results["transports"][transport] = {"methods": per_method, "ratios": per_method_ratios}
    return results


def format_table(results: dict[str, Any]) -> str:
    lines = [f"group {results['shape']} uint8, {results['groups']} groups, best of {results['repeats']}",
             f"{'transport':<10}{'method':<11}{'GB/s':>8}{'groups/s':>10}"]
    for transport, data in results["transports"].items():
        for method, run in data["methods"].items():
            lines.append(f"{transport:<10}{method:<11}{run['gb_per_s']:>8.2f}{run['groups_per_s']:>10.1f}")
        r = data["ratios"]
        lines.append(f"{transport:<10}ratios: protocol/bare {r['protocol_vs_bare']:.2f}x, protocol/bare+copy "
                     f"{r['protocol_vs_bare_copy']:.2f}x, protocol/pickle {r['protocol_vs_pickle']:.2f}x")
    return "\n".join(lines)
