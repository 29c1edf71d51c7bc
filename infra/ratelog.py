"""Rate-limited logging of repeated peer faults: the first of each kind per interval in full,
the rest as one summary line per interval with counts (garbage input cannot flood the log)."""
from __future__ import annotations

import collections
import logging
import threading
import time


class RateLimitedLog:
    """Count events by kind; log the first of each kind per ``interval_s``, then summaries.

    Call ``note`` for each event and ``flush`` now and then (each I/O loop turn, also while no
    event comes): once the interval is over, one line reports how many events of each kind were not
    logged; ``flush(force=True)`` (at shutdown) reports them at once. Thread-safe.
    """

    def __init__(self, logger: logging.Logger, what: str, interval_s: float = 10.0, level: int = logging.WARNING) -> None:
        self.logger = logger
        self.what = what
        self.interval_s = float(interval_s)
        self.level = level
        self.totals: collections.Counter[str] = collections.Counter()
        self._suppressed: collections.Counter[str] = collections.Counter()
        self._logged_kinds: set[str] = set()
        self._window_start = time.monotonic()
        self._lock = threading.Lock()

    def note(self, kind: str, text: str) -> None:
        with self._lock:
            self.totals[kind] += 1
            self._flush(time.monotonic(), False)
            if kind in self._logged_kinds:
                self._suppressed[kind] += 1
                return
            self._logged_kinds.add(kind)
        self.logger.log(self.level, "%s [%s]: %s (further ones are summed up every %g s)", self.what, kind, text, self.interval_s)

    def flush(self, now: float | None = None, force: bool = False) -> None:
        with self._lock:
            self._flush(time.monotonic() if now is None else now, force)

    def _flush(self, now: float, force: bool) -> None:
        if now - self._window_start < self.interval_s and not force:
            return
        if self._suppressed:
            counts = ", ".join(f"{kind}: {n}" for kind, n in sorted(self._suppressed.items()))
            self.logger.log(self.level, "%s: %d more in the last %.0f s (%s)", self.what,
                            sum(self._suppressed.values()), now - self._window_start, counts)
        self._suppressed.clear()
        self._logged_kinds.clear()
        self._window_start = now
