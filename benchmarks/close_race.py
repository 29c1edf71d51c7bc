"""Clean closes racing a stream: do closes pass for deaths, and do groups reach two trainers?

One ``GroupServer`` fed flat out, one client streaming throughout, and ``--closes`` clients in turn
that take ``--take`` groups and close (``bye``). Every group id delivered to any ``on_group`` is
counted; the result is the service's dead / left counts and the ids delivered more than once::

    python -m benchmarks.close_race --closes 100 --heartbeat-ms 100
"""
from __future__ import annotations

import argparse
import collections
import json
import threading

import numpy as np

from generator_service.config import GeneratorConfig
from protocol import Group
from protocol.client import GroupClient
from protocol.server import GroupServer


def run(closes: int = 100, heartbeat_ms: int = 100, take: int = 5) -> dict[str, int]:
    info = GeneratorConfig(images_per_group=2, save_size=32).welcome_info()
    delivered: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def count(group: Group) -> None:
        with lock:
            delivered[group.group_id] += 1

    with GroupServer("tcp://127.0.0.1:*", "race", info, heartbeat_ms=heartbeat_ms, max_queue=64) as server:
        def feed() -> None:
            i = 0
            while not stop.is_set():
                group = Group(group_id=f"g{i:07d}", caption_id=i, caption="c", seeds=[0, 1],
                              images=np.zeros((2, 32, 32, 3), np.uint8))
                i += server.put(group, timeout=0.2)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        with GroupClient([server.endpoint], count, client_name="stayer", credits=8):
            for _ in range(closes):
                took = threading.Semaphore(0)

                def closer(group: Group, took: threading.Semaphore = took) -> None:
                    count(group)
                    took.release()

                with GroupClient([server.endpoint], closer, client_name="closer", credits=8):
                    for _ in range(take):
                        took.acquire(timeout=30)
            stop.set()
            feeder.join()
        stats = server.stats()
    return {"closes": closes, "dead": stats.dead_clients, "left": stats.left_clients,
            "requeued": stats.requeued, "delivered_twice": sum(1 for n in delivered.values() if n > 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.close_race", description=__doc__.split("\n")[0])
    parser.add_argument("--closes", type=int, default=100)
    parser.add_argument("--heartbeat-ms", type=int, default=100)
    parser.add_argument("--take", type=int, default=5, help="groups each closing client takes before it closes")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.closes, args.heartbeat_ms, args.take)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
