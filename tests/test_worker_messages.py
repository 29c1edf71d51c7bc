"""The supervisor <-> worker messages: one class per kind, each crossing a real multiprocessing pipe intact."""
from __future__ import annotations

import multiprocessing as mp

import numpy as np

from generator_service.worker_messages import (
    BatchLimit,
    EncodedImages,
    Finish,
    GeneratedGroup,
    Groups,
    Ready,
    Task,
    TaskDone,
    TaskItem,
    WorkerFailed,
)


def test_every_message_kind_crosses_a_pipe_as_itself():
    images = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
    encoded = EncodedImages("png", [b"\x89PNG-a", b"\x89PNG-b"], (2, 8, 8, 3))
    messages = [
        Task(3, [TaskItem("g0", "a red circle", [1, 2]), TaskItem("g1", "a blue square", [3, 4])]),
        Finish(),
        Ready(1234, 0.5),
        Groups(3, [GeneratedGroup("g0", encoded, 0.25)]),
        TaskDone(3),
        BatchLimit(4),
        WorkerFailed("Traceback ...", False, ["g0", "g1"]),
    ]
    receive, send = mp.get_context("spawn").Pipe(duplex=False)
    try:
        for message in messages:
            send.send(message)
            got = receive.recv()
            assert type(got) is type(message) and got == message
        send.send(Groups(7, [GeneratedGroup("g2", images, 0.1)]))
        got = receive.recv()
        (group_id, got_images, seconds), = got.groups  # a group unpacks as (group_id, images, gen_seconds)
        assert (got.task_id, group_id, seconds) == (7, "g2", 0.1) and np.array_equal(got_images, images)
    finally:
        receive.close()
        send.close()
