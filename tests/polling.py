"""Waiting on a condition in tests: poll until it holds; a timeout fails naming what was awaited."""
from __future__ import annotations

import time
from typing import Callable


def wait_for(predicate: Callable[[], object], what: str = "the condition", timeout: float = 60.0,
             poll_s: float = 0.01) -> bool:
    """Call ``predicate`` every ``poll_s`` seconds until it is true; ``AssertionError`` naming ``what``
    after ``timeout`` seconds. Returns True, so ``assert wait_for(...)`` reads as a check."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(poll_s)
    return True


def signal_when(proc, ready: Callable[[], object], what: str, sig: int, timeout: float = 600.0) -> str:
    """Wait until ``ready()`` holds for the running subprocess ``proc`` (started with ``stderr=PIPE,
    text=True``), send it ``sig`` and return its stderr once it exited (``proc.returncode`` is set).
    Fails, showing that stderr, if it ended before ``what``; the process never outlives the call."""
    try:
        wait_for(lambda: ready() or proc.poll() is not None, what, timeout=timeout)
        assert proc.poll() is None, f"exited with {proc.returncode} before {what}: {proc.stderr.read()}"
        proc.send_signal(sig)
        return proc.communicate(timeout=300)[1]
    finally:
        proc.kill()  # a no-op once it exited
