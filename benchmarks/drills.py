"""Fault and attack drills against a real generator service: a good client's groups/s before,
during and after each attack, and the service's memory.

    stablerep-bench drills --output benchmarks/results     # python -m benchmarks.cli drills ...

The service is ``stablerep-generator --backend procedural`` in its own process, throttled to
``--rate`` groups/s so that production, not the client, is the bottleneck (as with GPU
generators). One good ``GroupClient`` streams throughout. Each attack runs for ``phase_s`` seconds
between a ``phase_s`` window before and one after it:

- ``nested``: headers nested 12 to 4000 levels deep, as fast as one socket sends;
- ``garbage``: random bytes;
- ``hoarders``: 4 clients grant 2**20 credits, heartbeat, never read;
- ``greedy``: 4 clients keep re-granting credit (without an ``ack``: they read no group id) and never read;
- ``costly_hellos``: hellos of ~3 KiB of small maps, and ones just over the 4 KiB limit;
- ``reconnect_storm``: 100 sockets say hello (past ``--max-clients``) and vanish, over and over.

Reported per attack: the good client's groups/s in each window, its share of the rate during the
attack, whether a fresh client still got ``welcome`` during it, the service's resident memory
(max over the drill), and the service's refusal counters are left to its metrics.
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import msgpack
import zmq

REPO = Path(__file__).resolve().parents[1]
ATTACKS = ("nested", "garbage", "hoarders", "greedy", "costly_hellos", "reconnect_storm")


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _tree_rss_mib(pid: int) -> float:
    """Resident MiB of the service process and its worker processes (Linux /proc)."""
    total = _rss_mib(pid)
    for child in Path("/proc").glob("[0-9]*"):
        try:
            if f" {pid} " in child.joinpath("stat").read_text().rsplit(")", 1)[1][:20]:
                total += _rss_mib(int(child.name))
        except (OSError, IndexError):
            continue
    return total


def nested_header(header: dict, field: str, depth: int) -> bytes:
    """``header`` packed with ``field`` holding arrays nested ``depth`` deep (one byte per level)."""
    marker = "\x00nested\x00"
    return msgpack.packb({**header, field: marker}).replace(msgpack.packb(marker), b"\x91" * depth + b"\x00")


def _dealer(context: zmq.Context, endpoint: str, rcvhwm: int | None = None) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if rcvhwm is not None:
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.connect(endpoint)
    return sock


def _attack(name: str, context: zmq.Context, endpoint: str, stop: threading.Event) -> None:
    from protocol import Credit, Heartbeat, Hello, encode

    if name in ("nested", "garbage", "costly_hellos"):
        sock = _dealer(context, endpoint, rcvhwm=16)
        if name == "nested":
            frames = [nested_header({"v": 1, "type": "credit"}, "n", 12), nested_header({"v": 1, "type": "credit"}, "n", 1000),
                      nested_header({"v": 1, "type": "hello"}, "client", 4000)]
        elif name == "garbage":
            rng = random.Random(0)
            frames = [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 2000))) for _ in range(64)]
        else:
            costly = msgpack.packb({"v": 1, "type": "hello", "client": "flood", "x": [{"a": [1, 2, 3]}] * 430})
            frames = [costly, costly + b"\x00" * (4097 - len(costly))]
        i = 0
        while not stop.is_set():
            try:
                sock.send_multipart([frames[i % len(frames)]], flags=zmq.NOBLOCK)
            except zmq.Again:
                stop.wait(0.001)
            i += 1
        sock.close()
    elif name in ("hoarders", "greedy"):
        socks = [_dealer(context, endpoint, rcvhwm=None if name == "hoarders" else 8) for _ in range(4)]
        for sock in socks:
            sock.send_multipart(encode(Hello(client=name)))
            sock.send_multipart(encode(Credit(n=1 << 20 if name == "hoarders" else 16)))
        while not stop.is_set():
            for sock in socks:
                sock.send_multipart(encode(Heartbeat() if name == "hoarders" else Credit(n=16)))
            stop.wait(0.05)
        for sock in socks:
            sock.close()
    elif name == "reconnect_storm":
        while not stop.is_set():
            socks = [_dealer(context, endpoint) for _ in range(100)]
            for sock in socks:
                sock.send_multipart(encode(Hello(client="storm")))
            stop.wait(0.2)
            for sock in socks:
                sock.close()
    else:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")


def _fresh_welcome(context: zmq.Context, endpoint: str, timeout_ms: int = 5000) -> bool:
    from protocol import Hello, Welcome, decode, encode

    sock = _dealer(context, endpoint)
    try:
        sock.send_multipart(encode(Hello(client="fresh")))
        return bool(sock.poll(timeout_ms)) and isinstance(decode(sock.recv_multipart()), Welcome)
    finally:
        sock.close()


def _wait_for_first_group(count: list[int], lock: threading.Lock, service: subprocess.Popen,
                          timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with lock:
            if count[0]:
                return
        if service.poll() is not None:
            raise RuntimeError(f"the drilled generator service exited with status {service.returncode} before serving")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no group from the drilled generator service within {timeout_s:g} s")
        time.sleep(0.05)


def run_drills(attacks: tuple[str, ...] = ATTACKS, rate: float = 100.0, phase_s: float = 5.0, side: int = 64,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    from generator_service.procedural import write_caption_file
    from infra.free_endpoint import free_tcp_endpoint
    from protocol.client import GroupClient

    import tempfile

    endpoint = free_tcp_endpoint()
    with tempfile.TemporaryDirectory() as tmp:
        captions = write_caption_file(Path(tmp) / "captions.txt", 4096)
        service = subprocess.Popen(
            [sys.executable, "-m", "generator_service.cli", "--backend", "procedural", "--gpus", "cpu:1",
             "--captions", str(captions), "--bind", endpoint, "--height", str(side), "--width", str(side),
             "--save-size", str(side), "--images-per-group", "2", "--max-groups-per-s", str(rate),
             "--max-credit", "16", "--no-progress", "--log-level", "ERROR"],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lock = threading.Lock()
        count = [0]

        def on_group(group: Any) -> None:
            with lock:
                count[0] += 1

        def window() -> float:
            with lock:
                start = count[0]
            time.sleep(phase_s)
            with lock:
                return (count[0] - start) / phase_s

        context = zmq.Context()
        client = GroupClient([endpoint], on_group, client_name="good", credits=16, connect_timeout=120)
        results: dict[str, Any] = {"rate_groups_per_s": rate, "phase_s": phase_s, "group_bytes": 2 * side * side * 3,
                                   "attacks": {}}
        try:
            client.start()
            _wait_for_first_group(count, lock, service)  # the service started its worker (seconds when loaded)
            time.sleep(phase_s)  # warm up: the worker at its throttle
            results["rss_mib_start"] = _tree_rss_mib(service.pid)
            peak = results["rss_mib_start"]
            for name in attacks:
                before = window()
                stop = threading.Event()
                attacker = threading.Thread(target=_attack, args=(name, context, endpoint, stop), daemon=True)
                attacker.start()
                during = window()
                welcomed = _fresh_welcome(context, endpoint)
                peak = max(peak, _tree_rss_mib(service.pid))
                stop.set()
                attacker.join(timeout=30)
                after = window()
                peak = max(peak, _tree_rss_mib(service.pid))
                alive = service.poll() is None
                results["attacks"][name] = {
                    "before_groups_per_s": before, "during_groups_per_s": during, "after_groups_per_s": after,
                    "kept_during": during / before if before else float("nan"),
                    "fresh_client_welcomed": welcomed, "service_alive": alive,
                }
                log(f"{name:<16} before {before:6.1f}  during {during:6.1f}  after {after:6.1f} groups/s; "
                    f"welcome during: {welcomed}; service alive: {alive}")
            results["rss_mib_peak"] = peak
            results["rss_mib_end"] = _tree_rss_mib(service.pid)
            results["client_stats"] = {"reconnects": client.stats().reconnects,
                                       "bad_messages": client.stats().bad_messages}
        finally:
            client.close()
            context.destroy(linger=0)
            service.terminate()
            try:
                service.wait(timeout=30)
            except subprocess.TimeoutExpired:
                service.kill()
    return results


def format_table(r: dict[str, Any]) -> str:
    lines = [f"drills: service throttled to {r['rate_groups_per_s']:g} groups/s of {r['group_bytes'] // 1024} KiB, "
             f"windows of {r['phase_s']:g} s; service RSS {r['rss_mib_start']:.0f} MiB at start, "
             f"{r['rss_mib_peak']:.0f} peak, {r['rss_mib_end']:.0f} at the end",
             f"{'attack':<16}{'before':>8}{'during':>8}{'after':>8}{'kept':>7}  welcome"]
    for name, a in r["attacks"].items():
        lines.append(f"{name:<16}{a['before_groups_per_s']:>8.1f}{a['during_groups_per_s']:>8.1f}"
                     f"{a['after_groups_per_s']:>8.1f}{a['kept_during']:>7.0%}  {'yes' if a['fresh_client_welcomed'] else 'NO'}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--rate", type=float, default=100.0, help="service throttle, groups/s (default 100)")
    parser.add_argument("--phase-s", type=float, default=5.0, help="seconds per window (default 5)")
    parser.add_argument("--image-size", type=int, default=64, help="generated image side (default 64)")
    parser.add_argument("--quick", action="store_true", help="windows of 0.5 s, 16 px images (tests the code path)")


def run_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], str, dict[str, float]]:
    if args.quick:
        args.phase_s, args.image_size = 0.5, 16
    result = run_drills(tuple(args.attacks), rate=args.rate, phase_s=args.phase_s, side=args.image_size)
    bars = {name: a["during_groups_per_s"] for name, a in result["attacks"].items()}
    return result, format_table(result), bars

