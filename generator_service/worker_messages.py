"""The messages between the worker pool's supervisor and its worker processes: one class per kind.

They travel over two one-way ``multiprocessing`` pipes, pickled: this is a process-internal channel
of one service, never the wire (protocol v1 pickles nothing).

- supervisor -> worker (``task_conn``): `Task` (caption groups to generate), `Finish` (finish the
  tasks received, then exit).
- worker -> supervisor (``result_conn``): `Ready` once the backend is built; `Groups` per finished
  batch; `TaskDone` after a task's last batch; `BatchLimit` after an out-of-memory halving;
  `WorkerFailed` just before the process exits with status 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Union

import numpy as np


class TaskItem(NamedTuple):
    """One caption group of a task: generate ``len(seeds)`` images of ``caption``."""

    group_id: str
    caption: str
    seeds: list[int]


class EncodedImages(NamedTuple):
    """A group's images encoded in the worker: ``data`` holds m png/jpeg/webp files of shape [m, H, W, 3]."""

    encoding: str
    data: list[bytes]
    shape: tuple[int, int, int, int]


class GeneratedGroup(NamedTuple):
    """One finished group: ``images`` uint8 [m, S, S, 3] (or `EncodedImages`), ``gen_seconds`` its share of the batch."""

    group_id: str
    images: np.ndarray | EncodedImages
    gen_seconds: float


# --- supervisor -> worker ---------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """Caption groups to generate (at most ``--worker-batch``); answered by `Groups` and one `TaskDone`."""

    task_id: int
    items: list[TaskItem]


@dataclass(frozen=True)
class Finish:
    """Finish every task received, then exit."""


# --- worker -> supervisor ---------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The backend is built (``load_seconds`` after the process started); tasks may come."""

    pid: int
    load_seconds: float


@dataclass(frozen=True)
class Groups:
    """Groups of task ``task_id`` finished in one batch."""

    task_id: int
    groups: list[GeneratedGroup]


@dataclass(frozen=True)
class TaskDone:
    """Every group of task ``task_id`` has been sent."""

    task_id: int


@dataclass(frozen=True)
class BatchLimit:
    """The worker ran out of memory and now runs at most ``captions`` captions per batch."""

    captions: int


@dataclass(frozen=True)
class WorkerFailed:
    """The worker is about to exit with status 1.

    ``traceback``: the error's text; ``during_startup``: the backend could not be built;
    ``group_ids``: the batch that raised (empty when none did).
    """

    traceback: str
    during_startup: bool
    group_ids: list[str]


ToWorker = Union[Task, Finish]
FromWorker = Union[Ready, Groups, TaskDone, BatchLimit, WorkerFailed]
