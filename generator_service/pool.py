"""The worker pool: one process per device, supervised.

The supervisor (this module, in the main process) hands out work items (one caption group each)
in tasks of up to ``worker_batch`` items over a pipe per worker, tracks what each worker has in
flight, and turns results into ``protocol.Group``s for a sink (shard writer, online server or both).

Guarantees:

- Exactly once: a result is accepted only if its group is in flight on the worker that sent it; a
  worker that dies (``kill -9``, crash) has its unanswered items re-queued at the front, and is
  restarted with exponential backoff. Nothing is lost, nothing is delivered twice.
- Bounded memory: each worker holds at most ``tasks_per_worker`` tasks; when the sink refuses
  groups (online queue full) no new work is handed out and the waiting is counted as idle time.
- Stop: ``StopSignal.request()`` (SIGINT/SIGTERM) stops handing out work; in-flight groups are
  finished and delivered (up to ``drain_timeout``), then workers exit. A second request stops at once.
"""
from __future__ import annotations

import collections
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from generator_service.config import GeneratorConfig
from generator_service.devices import worker_device_env
from generator_service.pool_types import GroupSink, PoolError, PoolStats, StopSignal, WorkItem
from generator_service.worker import WorkerSpec, worker_main
from generator_service.worker_messages import (
    BatchLimit,
    EncodedImages,
    Finish,
    FromWorker,
    Groups,
    Ready,
    Task,
    TaskDone,
    TaskItem,
    WorkerFailed,
)
from protocol import Group

__all__ = ["GroupSink", "PoolError", "PoolStats", "StopSignal", "WorkItem", "WorkerPool"]

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    """The supervisor's view of one worker (the process behind it changes on restart)."""

    index: int
    device: str
    process: Any = None
    task_conn: Any = None
    result_conn: Any = None
    ready: bool = False
    alive: bool = False
    pid: int | None = None
    in_flight: dict[str, WorkItem] = field(default_factory=dict)
    open_tasks: dict[int, int] = field(default_factory=dict)  # task_id -> items still expected
    restart_at: float | None = None
    consecutive_failures: int = 0
    restarts: int = 0
    last_error: str | None = None
    startup_error: bool = False
    batch_limit: int = 0
    groups: int = 0
    images: int = 0
    gen_seconds: float = 0.0
    idle_backpressure_s: float = 0.0
    load_seconds: float = 0.0


class WorkerPool:
    """Supervises one worker process per device.

    Args:
        config: the generator config (sent to each worker process as it is).
        fingerprint: the generator fingerprint, stamped on every group.
        devices: one torch device string per worker (``generator_service.devices.parse_devices``).
        worker_batch: captions per task (and per backend batch, until out of memory halves it).
        tasks_per_worker: tasks handed to a worker before it answers (2 keeps it busy between tasks).
        max_restarts: consecutive deaths of one worker, without a delivered group in between,
            after which the pool gives up.
        backoff_s / max_backoff_s: restart delay after the first death, doubling per further one.
        drain_timeout: seconds a stop waits for in-flight groups.
        throttle_groups: undelivered groups at which no new work is handed out
            (default: one round, ``len(devices) * worker_batch``).
        image_codec: ``(format, quality)`` to have workers encode images (png/jpg/webp) in parallel,
            for runs whose only output is shards; ``None`` sends raw uint8 arrays.
        threads_per_worker: torch CPU threads per worker (default: the host's cores / workers).
    """

    def __init__(
        self,
        config: GeneratorConfig,
        fingerprint: str,
        devices: list[str],
        worker_batch: int = 8,
        tasks_per_worker: int = 2,
        max_restarts: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        drain_timeout: float = 300.0,
        throttle_groups: int | None = None,
        log_level: int = logging.INFO,
        image_codec: tuple[str, int] | None = None,
        threads_per_worker: int | None = None,
    ) -> None:
        if not devices:
            raise ValueError("the pool needs at least one device")
        if worker_batch < 1:
            raise ValueError(f"worker_batch must be >= 1, got {worker_batch}")
        self.config = config
        self.fingerprint = fingerprint
        self.devices = list(devices)
        self.worker_batch = int(worker_batch)
        self.tasks_per_worker = max(1, int(tasks_per_worker))
        self.max_restarts = int(max_restarts)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.drain_timeout = float(drain_timeout)
        self.throttle_groups = int(throttle_groups or len(devices) * worker_batch)
        self.log_level = log_level
        self.image_codec = image_codec
        self._ctx = mp.get_context("spawn")
        self._cpu_threads = threads_per_worker or max(1, (os.cpu_count() or 1) // len(devices))
        self.workers = [WorkerState(i, d, batch_limit=self.worker_batch) for i, d in enumerate(devices)]
        self._pending: collections.deque[WorkItem] = collections.deque()
        self._source: Iterator[WorkItem] = iter(())
        self._source_done = False
        self._undelivered: collections.deque[Group] = collections.deque()
        self._next_task_id = 0
        self._started_at = time.monotonic()
        self.groups_delivered = 0
        self.images_delivered = 0
        self.duplicates_dropped = 0
        self.requeued = 0
        self.settled_at_stop = 0
        self.max_item_failures = 2
        self._failures: dict[str, int] = {}

    # --- worker processes --------------------------------------------------------------------

    def _spawn(self, worker: WorkerState) -> None:
        task_recv, task_send = self._ctx.Pipe(duplex=False)
        result_recv, result_send = self._ctx.Pipe(duplex=False)
        with worker_device_env(worker.device) as local_device:
            spec = WorkerSpec(
                index=worker.index,
                device=local_device,
                config=self.config,
                worker_batch=worker.batch_limit,
                num_threads=self._cpu_threads,
                log_level=self.log_level,
                image_codec=self.image_codec,
            )
            process = self._ctx.Process(
                target=worker_main,
                args=(spec, task_recv, result_send),
                name=f"generator-worker-{worker.index}",
                daemon=True,
            )
            process.start()
        # Keep only our ends, so a dead worker reads as EOF on its result pipe.
        task_recv.close()
        result_send.close()
        worker.process, worker.task_conn, worker.result_conn = process, task_send, result_recv
        worker.alive, worker.ready, worker.pid = True, False, process.pid
        worker.open_tasks.clear()
        worker.restart_at = None
        worker.startup_error = False
        log.info("worker %d on %s started (pid %d)", worker.index, worker.device, process.pid)

    def _on_death(self, worker: WorkerState, now: float, stopping: bool) -> None:
        self._drain_messages(worker)
        worker.process.join(timeout=1.0)
        code = worker.process.exitcode
        for conn in (worker.task_conn, worker.result_conn):
            conn.close()
        lost = list(worker.in_flight.values())
        worker.in_flight.clear()
        worker.open_tasks.clear()
        worker.alive = worker.ready = False
        self._pending.extendleft(reversed(lost))
        self.requeued += len(lost)
        if stopping:
            return
        if worker.startup_error:
            raise PoolError(
                f"worker {worker.index} on {worker.device} could not start the backend:\n{worker.last_error}"
            )
        worker.consecutive_failures += 1
        worker.restarts += 1
        if worker.consecutive_failures > self.max_restarts:
            raise PoolError(
                f"worker {worker.index} on {worker.device} died {worker.consecutive_failures} times in a row "
                f"(last exit code {code}); last error:\n{worker.last_error or '(none reported)'}"
            )
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (worker.consecutive_failures - 1))
        worker.restart_at = now + delay
        log.warning(
            "worker %d on %s (pid %s) died with exit code %s; %d group(s) re-queued; restarting in %.1fs",
            worker.index, worker.device, worker.pid, code, len(lost), delay,
        )

    # --- messages ----------------------------------------------------------------------------

    def _drain_messages(self, worker: WorkerState) -> None:
        """Handle every complete message waiting on the worker's result pipe."""
        conn = worker.result_conn
        try:
            while conn.poll():
                self._handle(worker, conn.recv())
        except (EOFError, OSError):
            pass  # the worker is gone; a torn last message is discarded with it

    def _handle(self, worker: WorkerState, message: FromWorker) -> None:
        match message:
            case Groups(groups=results):
                for group_id, images, seconds in results:
                    item = worker.in_flight.pop(group_id, None)
                    if item is None:
                        self.duplicates_dropped += 1
                        log.warning("dropping result for %s from worker %d: not in flight there", group_id, worker.index)
                        continue
                    group = self._make_group(item, images, seconds)
                    self._undelivered.append(group)
                    worker.groups += 1
                    worker.images += group.num_images
                    worker.gen_seconds += float(seconds)
                    worker.consecutive_failures = 0
            case TaskDone(task_id=task_id):
                worker.open_tasks.pop(task_id, None)
            case Ready(pid=pid, load_seconds=load_seconds):
                worker.pid, worker.load_seconds = pid, load_seconds
                worker.ready = True
                log.info("worker %d on %s ready (backend built in %.1fs)", worker.index, worker.device, load_seconds)
            case BatchLimit(captions=captions):
                worker.batch_limit = int(captions)
                log.warning("worker %d on %s now runs %d captions per batch", worker.index, worker.device, captions)
            case WorkerFailed():
                worker.last_error, worker.startup_error = message.traceback, message.during_startup
                self._count_failures(worker, message.group_ids)
            case _:
                log.error("unknown message %s from worker %d", type(message).__name__, worker.index)

    def _count_failures(self, worker: WorkerState, group_ids: list[str]) -> None:
        """A batch failed on ``worker``: a group that failed ``max_item_failures`` times ends the run."""
        for group_id in group_ids:
            self._failures[group_id] = self._failures.get(group_id, 0) + 1
            item = worker.in_flight.get(group_id)
            if item is not None and self._failures[group_id] >= self.max_item_failures:
                raise PoolError(
                    f"caption {item.caption_id} ({item.caption!r}) failed to generate "
                    f"{self._failures[group_id]} times; last error:\n{worker.last_error}"
                )

    def _make_group(self, item: WorkItem, images: np.ndarray | EncodedImages, seconds: float) -> Group:
        if isinstance(images, EncodedImages):
            return Group(
                group_id=item.group_id,
                caption_id=item.caption_id,
                caption=item.caption,
                seeds=list(item.seeds),
                encoded=list(images.data),
                encoding=images.encoding,
                shape=images.shape,
                generator=self.fingerprint,
                gen_seconds=seconds,
            )
        return Group(
            group_id=item.group_id,
            caption_id=item.caption_id,
            caption=item.caption,
            seeds=list(item.seeds),
            images=images,
            generator=self.fingerprint,
            gen_seconds=seconds,
        )

    # --- scheduling --------------------------------------------------------------------------

    def _next_items(self, limit: int) -> list[WorkItem]:
        items: list[WorkItem] = []
        while len(items) < limit and self._pending:
            items.append(self._pending.popleft())
        while len(items) < limit and not self._source_done:
            try:
                items.append(next(self._source))
            except StopIteration:
                self._source_done = True
        return items

    def _dispatch(self) -> None:
        for worker in sorted(self.workers, key=lambda w: len(w.open_tasks)):
            if not (worker.alive and worker.ready) or len(worker.open_tasks) >= self.tasks_per_worker:
                continue
            if len(self._undelivered) >= self.throttle_groups:
                return
            items = self._next_items(self.worker_batch)
            if not items:
                return
            task_id = self._next_task_id
            self._next_task_id += 1
            for item in items:
                worker.in_flight[item.group_id] = item
            worker.open_tasks[task_id] = len(items)
            try:
                worker.task_conn.send(Task(task_id, [TaskItem(i.group_id, i.caption, i.seeds) for i in items]))
            except OSError:
                pass  # it died: its sentinel fires next and the items are re-queued

    def _deliver(self, sink: GroupSink) -> None:
        while self._undelivered:
            group = self._undelivered[0]
            if not sink.offer(group):
                return
            self._undelivered.popleft()
            self.groups_delivered += 1
            self.images_delivered += group.num_images

    def _settle(self, sink: GroupSink) -> None:
        """At a stop: hand undelivered groups to the sinks that take them now (``sink.settle``), drop the rest."""
        settle = getattr(sink, "settle", None)
        if self._undelivered:
            log.warning("stopping: %d generated group(s) had not reached every output yet; they are written to "
                        "the shard folder if there is one (a trainer that is not connected gets none of them)",
                        len(self._undelivered))
        while self._undelivered:
            group = self._undelivered.popleft()
            self.settled_at_stop += 1
            if settle is not None:
                settle(group)

    def _has_work(self) -> bool:
        return bool(self._pending) or not self._source_done

    def _in_flight(self) -> int:
        return sum(len(w.in_flight) for w in self.workers)

    # --- main loop ---------------------------------------------------------------------------

    def run(
        self,
        items: Iterator[WorkItem],
        sink: GroupSink,
        stop: StopSignal | None = None,
        on_tick: Callable[["WorkerPool"], None] | None = None,
    ) -> PoolStats:
        """Generate every item of ``items`` (or until ``stop``) into ``sink``; returns final stats.

        Raises ``PoolError`` when a worker cannot start its backend or keeps dying.
        """
        stop = stop or StopSignal()
        self._source = iter(items)
        self._started_at = time.monotonic()
        try:  # nothing to do (e.g. a resumed run that is complete): start no process
            self._pending.append(next(self._source))
        except StopIteration:
            self._source_done = True
            return self.stats()
        for worker in self.workers:
            self._spawn(worker)
        drain_deadline: float | None = None
        last = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if stop.requested and drain_deadline is None:
                    drain_deadline = now + self.drain_timeout
                    log.info("stop requested: finishing %d group(s) in flight", self._in_flight())
                stopping = drain_deadline is not None
                if stop.immediate:
                    log.warning("second stop request: stopping now, %d group(s) in flight dropped", self._in_flight())
                    break
                if not stopping:
                    for worker in self.workers:
                        if not worker.alive and worker.restart_at is not None and now >= worker.restart_at:
                            self._spawn(worker)
                self._deliver(sink)
                throttled = len(self._undelivered) >= self.throttle_groups
                if not stopping:
                    self._dispatch()
                self._account_idle(now - last, throttled)
                last = now
                if on_tick is not None:
                    on_tick(self)
                in_flight = self._in_flight()
                if in_flight == 0 and not self._undelivered and (stopping or not self._has_work()):
                    break
                if stopping and in_flight == 0:  # the rest cannot be delivered now (e.g. no client credit)
                    break
                if stopping and now >= drain_deadline:
                    log.warning("drain timeout: %d group(s) in flight dropped", in_flight)
                    break
                self._wait(0.02 if self._undelivered else 0.2, stopping)
        except PoolError:
            self._deliver(sink)  # keep what was generated before the failure
            self._settle(sink)
            raise
        finally:
            self._shutdown(immediate=stop.immediate)
        self._settle(sink)
        return self.stats()

    def _wait(self, timeout: float, stopping: bool) -> None:
        live = [w for w in self.workers if w.alive]
        handles: dict[Any, tuple[WorkerState, str]] = {}
        for worker in live:
            handles[worker.result_conn] = (worker, "result")
            handles[worker.process.sentinel] = (worker, "exit")
        if not handles:
            time.sleep(timeout)
            return
        ready = multiprocessing.connection.wait(list(handles), timeout=timeout)
        dead = []
        for handle in ready:
            worker, what = handles[handle]
            if what == "result":
                self._drain_messages(worker)
            elif worker not in dead:
                dead.append(worker)
        for worker in dead:
            self._on_death(worker, time.monotonic(), stopping)

    def _account_idle(self, dt: float, throttled: bool) -> None:
        if not throttled:
            return
        for worker in self.workers:
            if worker.alive and worker.ready and not worker.open_tasks:
                worker.idle_backpressure_s += dt

    def _shutdown(self, immediate: bool = False) -> None:
        for worker in self.workers:
            if worker.alive and (immediate or not worker.ready):  # starting workers hold no work
                worker.process.kill()
            elif worker.alive:
                try:
                    worker.task_conn.send(Finish())
                except OSError:
                    pass
        deadline = time.monotonic() + 10.0
        for worker in self.workers:
            if worker.process is None:
                continue
            worker.process.join(timeout=max(0.1, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5.0)
            if worker.alive:
                for conn in (worker.task_conn, worker.result_conn):
                    conn.close()
            worker.alive = False

    # --- reporting ---------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        return PoolStats(
            elapsed_s=time.monotonic() - self._started_at,
            groups_delivered=self.groups_delivered,
            images_delivered=self.images_delivered,
            in_flight=self._in_flight(),
            pending=len(self._pending),
            undelivered=len(self._undelivered),
            duplicates_dropped=self.duplicates_dropped,
            requeued=self.requeued,
            settled_at_stop=self.settled_at_stop,
            restarts=sum(w.restarts for w in self.workers),
            workers=[
                {
                    "index": w.index,
                    "device": w.device,
                    "pid": w.pid,
                    "alive": w.alive,
                    "ready": w.ready,
                    "groups": w.groups,
                    "images": w.images,
                    "gen_seconds": round(w.gen_seconds, 3),
                    "restarts": w.restarts,
                    "batch_limit": w.batch_limit,
                    "idle_backpressure_s": round(w.idle_backpressure_s, 3),
                }
                for w in self.workers
            ],
        )
