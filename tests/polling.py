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
