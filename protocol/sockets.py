"""Socket helpers shared by both ends: options, safe send, a wake-up pipe for I/O threads."""
from __future__ import annotations

import os
import time

import zmq

from .codec import encode
from .limits import MAX_MESSAGE_BYTES
from .messages import Message


def configure(socket: zmq.Socket, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
    """Options every protocol socket gets: a size limit enforced by ZeroMQ, no linger on close."""
    socket.setsockopt(zmq.MAXMSGSIZE, int(max_bytes))
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 10_000)
    socket.setsockopt(zmq.RCVHWM, 10_000)


def send(socket: zmq.Socket, msg: Message, identity: bytes | None = None, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
    """Encode and send without blocking; image frames are sent zero-copy."""
    frames = encode(msg, max_bytes=max_bytes)
    if identity is not None:
        frames = [identity, *frames]
    socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)


class WakePipe:
    """A pipe another thread writes to, to wake an I/O thread blocked in ``zmq.Poller.poll``."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def wake(self) -> None:
        try:
            os.write(self.write_fd, b"\0")
        except (BlockingIOError, OSError):
            pass  # already full of wake-ups, or closed during shutdown

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def monotonic() -> float:
    return time.monotonic()
