"""One generator worker process: owns a device and a backend, turns tasks into caption groups.

Messages with the supervisor (``generator_service.pool``) go over two one-way pipes, one class per
kind (`generator_service.worker_messages`): `Task` / `Finish` in; `Ready`, `Groups` (images uint8
``[m, S, S, 3]`` or, when the spec asks for an image codec, `EncodedImages`), `TaskDone`,
`BatchLimit` and `WorkerFailed` out.

Results leave through an ``Outbox`` thread, so encoding and the pipe overlap the next batch.
Batches go to the backend with ``submit``: a backend that overlaps (diffusers) denoises the next
batch while its finisher thread decodes this one and hands it, then ``task_done``, to the outbox.
A task holds at most ``--worker-batch`` captions; they run as one backend batch unless the device
ran out of memory, in which case the worker halves its batch limit, logs it, and retries.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from generator_service.backends import backend_facts, create_backend
from generator_service.config import GeneratorConfig
from generator_service.worker_messages import (
    BatchLimit,
    EncodedImages,
    Finish,
    FromWorker,
    GeneratedGroup,
    Groups,
    Ready,
    TaskDone,
    TaskItem,
    WorkerFailed,
)

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs; picklable for the spawn start method.

    ``device`` is the torch device the worker uses in its own process: ``cuda:0`` for a GPU worker
    (its physical GPU is the only one ``CUDA_VISIBLE_DEVICES`` shows it), ``cpu`` otherwise.
    ``num_threads``: torch CPU threads, the host's cores divided among the workers.
    """

    index: int
    device: str
    config: GeneratorConfig
    worker_batch: int
    num_threads: int = 1
    log_level: int = logging.INFO
    image_codec: tuple[str, int] | None = None  # (format, quality): send encoded images (offline-only runs)


class Outbox:
    """Sends a worker's results from a background thread, so encoding, pickling and the pipe
    overlap the next batch's generation. Messages go out in order; ``put`` blocks while
    ``max_pending`` messages wait (bounded memory). A broken pipe (supervisor gone) ends the worker;
    any other exception in the thread (an image that fails to encode, a message that fails to
    pickle) is kept in ``error`` and raised by the next ``put``, so the worker fails loudly (the
    supervisor restarts it) instead of blocking forever on a queue nobody empties.
    """

    def __init__(self, conn: Any, image_codec: tuple[str, int] | None = None, max_pending: int = 4) -> None:
        self.conn = conn
        self.image_codec = image_codec
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.broken = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="worker-outbox", daemon=True)
        self.thread.start()

    def put(self, message: FromWorker) -> None:
        while True:
            if self.error is not None:
                raise RuntimeError(f"worker outbox thread failed: {type(self.error).__name__}: {self.error}") from self.error
            if self.broken.is_set():
                raise BrokenPipeError("the supervisor is gone")
            try:
                self.queue.put(message, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self, timeout: float = 60.0) -> None:
        """Send everything queued, then stop the thread."""
        if not self.broken.is_set():
            try:
                self.queue.put(None, timeout=timeout)
            except queue.Full:
                return
        self.thread.join(timeout=timeout)

    def _run(self) -> None:
        try:
            self._send_all()
        except BaseException as exc:
            self.error = exc
            self.broken.set()

    def _send_all(self) -> None:
        while True:
            message = self.queue.get()
            if message is None:
                return
            if isinstance(message, Groups) and self.image_codec is not None:
                message = Groups(message.task_id, [GeneratedGroup(g.group_id, self._encode(g.images), g.gen_seconds)
                                                   for g in message.groups])
            try:
                self.conn.send(message)
            except (OSError, ValueError):
                self.broken.set()
                return

    def _encode(self, images: np.ndarray) -> EncodedImages:
        from generator_service.shards import IMAGE_FORMATS, encode_image

        image_format, quality = self.image_codec  # type: ignore[misc]
        data = [encode_image(image, image_format, quality) for image in images]
        return EncodedImages(IMAGE_FORMATS[image_format][1], data, tuple(int(d) for d in images.shape))  # type: ignore[arg-type]


class GenerationFailed(RuntimeError):
    """The backend raised (not out of memory) on a batch; ``group_ids`` names the batch."""

    def __init__(self, group_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"generating {len(group_ids)} group(s) failed: {type(cause).__name__}: {cause}")
        self.group_ids = group_ids


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)


def generate_task(
    backend: Any,
    items: list[TaskItem],
    batch_limit: int,
    emit: Callable[[list[GeneratedGroup]], None],
    on_batch_limit: Callable[[int], None] = lambda n: None,
    on_task_done: Callable[[], None] = lambda: None,
    on_failed: Callable[[GenerationFailed], None] | None = None,
) -> int:
    """Submit ``items`` to ``backend`` (a `Backend`, or a bare ``generate`` function) in batches of at most ``batch_limit`` captions.

    Each finished batch goes to ``emit`` as ``[GeneratedGroup(group_id, images [m, S, S, 3], gen_seconds)]``
    (``gen_seconds``: the batch's wall time from submission to finish, per group), and after the
    task's last batch ``on_task_done()`` is called; with an overlapping backend both happen in its
    finisher thread, in order, while the caller goes on. A batch that fails while finishing goes to
    ``on_failed`` as ``GenerationFailed`` (raised here when ``on_failed`` is None and the backend
    finishes inline). An out-of-memory error while submitting halves the batch limit
    (``on_batch_limit`` is told) and the batch is retried; at a limit of one caption, or for any
    other error, ``GenerationFailed`` is raised. A backend with ``static_batch`` (a compiled model)
    always gets ``batch_limit`` captions: a shorter last batch is padded with copies of its last
    caption, whose images are dropped, so the model sees one shape and never recompiles mid-run
    (until an out-of-memory halving). Returns the final batch limit.
    """
    def raise_failed(failure: GenerationFailed) -> None:
        raise failure

    on_failed = on_failed or raise_failed
    submit = getattr(backend, "submit", None) or _inline_submit(backend)
    position = 0
    while position < len(items):
        chunk = items[position : position + batch_limit]
        submitted = chunk
        if getattr(backend, "static_batch", False) and len(chunk) < batch_limit:
            submitted = chunk + [chunk[-1]] * (batch_limit - len(chunk))  # padding; done() keeps len(chunk)
        group_ids = [group_id for group_id, _, _ in chunk]
        last = position + len(chunk) == len(items)
        started = time.perf_counter()

        def done(images, chunk=chunk, started=started, last=last) -> None:
            seconds_each = (time.perf_counter() - started) / len(chunk)
            emit([GeneratedGroup(group_id, images[i], seconds_each) for i, (group_id, _, _) in enumerate(chunk)])
            if last:
                on_task_done()

        def failed(exc: BaseException, group_ids=group_ids) -> None:
            on_failed(GenerationFailed(group_ids, exc))

        try:
            submit([caption for _, caption, _ in submitted], [list(seeds) for _, _, seeds in submitted], done, failed)
        except GenerationFailed:
            raise
        except Exception as exc:
            if not _is_out_of_memory(exc) or len(chunk) == 1:
                raise GenerationFailed(group_ids, exc) from exc
            batch_limit = max(1, len(chunk) // 2)
            log.warning("out of memory with %d captions per batch; retrying with %d", len(chunk), batch_limit)
            _release_cached_memory()
            on_batch_limit(batch_limit)
            continue
        position += len(chunk)
    return batch_limit


def _inline_submit(generate: Callable[[list[str], list[list[int]]], np.ndarray]):
    """``submit`` for a bare ``generate(captions, seeds)`` function: finish inline."""

    def submit(captions, seeds, done, failed) -> None:
        done(generate(captions, seeds))

    return submit


def _release_cached_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _quiet_loading_bars() -> None:
    """One "Loading pipeline components" bar per worker clutters the service's console; keep it quiet."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _setup_device(spec: WorkerSpec) -> None:
    """Bind the worker to its device (a host-only backend's worker opens no CUDA context) and its CPU threads."""
    import torch

    if spec.device.startswith("cuda") and not backend_facts(spec.config.backend).host_only:
        torch.cuda.set_device(torch.device(spec.device))
    torch.set_num_threads(max(1, spec.num_threads))  # the host's cores, shared among the workers


def worker_main(spec: WorkerSpec, task_conn: Any, result_conn: Any) -> None:
    """Entry point of a worker process (``multiprocessing`` spawn target)."""
    # Ctrl-C reaches the whole process group; the supervisor decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=spec.log_level, format=f"%(asctime)s worker{spec.index}[{spec.device}] %(levelname)s %(message)s"
    )
    during_startup = True
    outbox = Outbox(result_conn, spec.image_codec)
    try:
        started = time.perf_counter()
        _setup_device(spec)
        if backend_facts(spec.config.backend).loads_diffusers_pipeline:
            _quiet_loading_bars()
        backend = create_backend(spec.config, device=spec.device)
        outbox.put(Ready(os.getpid(), time.perf_counter() - started))
        during_startup = False
        batch_limit = spec.worker_batch
        while True:
            try:
                task = task_conn.recv()
            except (EOFError, OSError):  # the supervisor is gone
                break
            if isinstance(task, Finish):
                break
            batch_limit = generate_task(
                backend,
                task.items,
                batch_limit,
                emit=lambda groups, task_id=task.task_id: outbox.put(Groups(task_id, groups)),
                on_batch_limit=lambda n: outbox.put(BatchLimit(n)),
                on_task_done=lambda task_id=task.task_id: outbox.put(TaskDone(task_id)),
                on_failed=lambda failure: _fail(spec, outbox, failure, during_startup=False),
            )
        backend.drain()
        outbox.close()
        backend.close()
    except BrokenPipeError:  # the supervisor is gone; nothing to report to
        os._exit(1)
    except BaseException as exc:
        _fail(spec, outbox, exc, during_startup)


def _fail(spec: WorkerSpec, outbox: Outbox, exc: BaseException, during_startup: bool) -> None:
    """Report ``exc`` to the supervisor and end the process (from the main or the finisher thread)."""
    text = "".join(traceback.format_exception(exc))
    log.error("worker %d failed:\n%s", spec.index, text)
    failed = exc.group_ids if isinstance(exc, GenerationFailed) else []
    try:
        if outbox.error is not None:  # the outbox thread is gone: report on the pipe directly
            outbox.conn.send(WorkerFailed(text, during_startup, failed))
        else:
            outbox.put(WorkerFailed(text, during_startup, failed))
            outbox.close(timeout=10.0)
    except (BrokenPipeError, RuntimeError, OSError):
        pass
    os._exit(1)
