"""What keeps the training step off the host's critical path: batch prefetch and deferred loss checks.

* :class:`Prefetcher` draws batch ``k+1`` from the source (and starts its copy to the device) in a
  background thread while step ``k`` runs. It keeps the source's state as it was before each
  prefetched draw, so a checkpoint never counts a batch that was drawn but not trained on.
* :class:`LossLedger` keeps each step's loss on the device and reads them back in one transfer at
  check steps (log steps, checkpoint saves, the last step, a stop), instead of ``loss.item()`` (a
  host-device sync) every step. The first non-finite loss is found there.

What happens to the steps between a non-finite loss and the check that finds it: their updates are
applied to the weights in memory (the device does not wait for the host's verdict), and the run
then stops with :class:`trainer.loop.NonFiniteLossError` naming the first bad step. No checkpoint is
written in between (every save checks first), so the last checkpoint on disk is the last good one,
and ``--resume`` continues from it. A non-finite loss on a check step itself stops before that
step's update, as every step did when each step synced.
"""
from __future__ import annotations

import math
import queue
import threading
from typing import Any

import torch


class _Failed:
    """An exception raised by the source in the prefetch thread, re-raised in the caller."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Prefetcher:
    """``next()`` returns the source's next batch already on ``device``; the one after is drawn meanwhile.

    One batch is drawn ahead (memory: one extra batch). On CUDA its copy runs on a stream of its own
    and the caller's stream waits for it. Exceptions of the source (``TimeoutError``,
    ``GeneratorsSilentError``, ...) are raised by the ``next()`` that would have returned that batch;
    nothing is drawn ahead after one, and a later ``next()`` draws again. ``state_dict()`` is the source's state before the draw
    of the batch not handed out yet: the state as of the batches the caller has taken. ``limit``:
    how many batches the caller will take at most (none is drawn ahead past the last one).
    """

    def __init__(self, source: Any, device: torch.device, limit: int | None = None) -> None:
        self.source, self.device, self.limit = source, torch.device(device), limit
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._taken = 0
        self._ready: queue.Queue = queue.Queue(maxsize=1)
        self._want = threading.Semaphore(0)
        self._closed = threading.Event()
        self._lock = threading.Lock()  # held while the source's state is read, so no draw starts meanwhile
        self._state_before_pending: dict | None = None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, name="batch-prefetch", daemon=True)
        self._started = False
        self._in_flight = False  # a draw was asked for and its batch not taken yet

    def _draw(self) -> tuple[Any, Any]:
        with self._lock:
            self._state_before_pending = self.source.state_dict()
        batch = self.source.next_batch()
        if self._stream is None:
            return batch.to(self.device, non_blocking=True), None
        with torch.cuda.stream(self._stream):
            batch = batch.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._stream)
        return batch, copied

    def _run(self) -> None:
        if self.device.type == "cuda":  # a new thread starts on device 0: make the training device current
            torch.cuda.set_device(self.device)
        while True:
            self._want.acquire()
            if self._closed.is_set():
                return
            try:
                item: Any = self._draw()
            except BaseException as exc:  # handed to the caller's next()
                item = _Failed(exc)
            if self._closed.is_set():
                return
            self._ready.put(item)

    def next(self) -> Any:
        """The next batch on the device; starts drawing the one after it."""
        if not self._started:
            self._started = True
            self._thread.start()
        if not self._in_flight:
            self._want.release()
        item = self._ready.get()
        self._in_flight = False
        with self._lock:
            self._state_before_pending = None
        if isinstance(item, _Failed):
            raise item.exc
        self._taken += 1
        if self.limit is None or self._taken < self.limit:
            self._want.release()  # draw the next one while the caller's step runs
            self._in_flight = True
        batch, copied = item
        if copied is not None:  # the caller's stream waits for the copy; the memory stays the caller's
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(copied)
            for tensor in (batch.images, batch.caption_ids):
                tensor.record_stream(stream)
        return batch

    def state_dict(self) -> dict:
        """The source's state as of the batches handed out (not counting the one drawn ahead)."""
        with self._lock:
            if self._state_before_pending is not None:
                return self._state_before_pending
            return self.source.state_dict()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread; a draw in flight may finish within ``timeout`` seconds, else it is left to
        end when the source is closed (the thread is a daemon). The source stays open."""
        self._closed.set()
        self._want.release()
        if self._started:
            self._thread.join(timeout)


class LossLedger:
    """Per-step losses kept on the device; read back and checked in one transfer by :meth:`flush`.

    ``values`` holds every flushed loss as a float (step ``first_step + 1`` first).
    """

    def __init__(self, first_step: int) -> None:
        self.first_step = first_step
        self.values: list[float] = []
        self._pending: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor) -> None:
        """Record this step's loss (a 0-d tensor); no host sync."""
        self._pending.append(loss.detach().float().reshape(()))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> tuple[int, float] | None:
        """Move the pending losses to ``values`` (one host-device transfer); return ``(step, loss)``
        of the first non-finite one among them (steps count from 1), or None when all are finite."""
        if not self._pending:
            return None
        start = len(self.values)
        self.values.extend(torch.stack(self._pending).tolist())
        self._pending.clear()
        for offset, value in enumerate(self.values[start:]):
            if not math.isfinite(value):
                return self.first_step + start + offset + 1, value
        return None

    def last(self) -> float | None:
        return self.values[-1] if self.values else None
