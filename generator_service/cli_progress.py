"""Progress displays of a ``stablerep-generator`` run: a bar offline, a status line online."""
from __future__ import annotations

import logging
import time
from typing import Any

from generator_service.live_metrics import idle_ratio
from generator_service.pool import WorkerPool

log = logging.getLogger("stablerep-generator")


class OfflineProgress:
    """tqdm bar over caption groups, with images/s."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="group", desc="generating", disable=not enabled, dynamic_ncols=True)
        self.shown = 0

    def __call__(self, pool: WorkerPool, server: Any) -> None:
        delta = pool.groups_delivered - self.shown
        if delta:
            self.bar.update(delta)
            self.shown = pool.groups_delivered
            self.bar.set_postfix(img_s=f"{pool.stats().images_per_second:.1f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


class OnlineStatus:
    """A status line every ``every`` seconds: images/s per device, queue, clients and credits, idle time
    and its share of worker time (``stablerep_generator_idle_ratio``)."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.last_time = time.monotonic()
        self.last_images: dict[int, int] = {}

    def __call__(self, pool: WorkerPool, server: Any) -> None:
        now = time.monotonic()
        if now - self.last_time < self.every:
            return
        dt, self.last_time = now - self.last_time, now
        rates = []
        for worker in pool.workers:
            rates.append(f"{worker.device}#{worker.index} {(worker.images - self.last_images.get(worker.index, 0)) / dt:.1f}")
            self.last_images[worker.index] = worker.images
        idle = sum(w.idle_backpressure_s for w in pool.workers)
        ratio = idle_ratio(idle, sum(w.gen_seconds for w in pool.workers))
        line = f"img/s [{', '.join(rates)}] | groups {pool.groups_delivered}"
        if server is not None:
            stats = server.stats()
            credits = sum(c["credits"] for c in stats.clients.values())
            line += (
                f" | queue {stats.queue_depth}/{stats.queue_capacity} | clients {len(stats.clients)} (credits {credits})"
                f" | sent {stats.groups_sent}"
            )
        line += f" | idle (queue full) {idle:.1f}s ({100 * ratio:.0f}%)"  # the share of worker time: idle_ratio
        log.info(line)

    def close(self) -> None:
        pass
