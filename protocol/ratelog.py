"""Rate-limited logging of repeated peer faults: the first of each kind per interval in full,
the rest as one summary line per interval with counts (garbage input cannot flood the log)."""
from __future__ import annotations

import collections
import logging
import time


class RateLimitedLog:
    """Count events by kind; log the first of each kind per ``interval_s``, then summaries.

    Call ``note`` for each event and ``flush`` now and then (each I/O loop turn): once the
    interval is over, one line reports how many events of each kind were not logged.
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

    def note(self, kind: str, text: str) -> None:
        self.totals[kind] += 1
        self.flush()
        if kind in self._logged_kinds:
            self._suppressed[kind] += 1
            return
        self._logged_kinds.add(kind)
        self.logger.log(self.level, "%s [%s]: %s (further ones are summed up every %g s)", self.what, kind, text, self.interval_s)

    def flush(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now - self._window_start < self.interval_s:
            return
        if self._suppressed:
            counts = ", ".join(f"{kind}: {n}" for kind, n in sorted(self._suppressed.items()))
            self.logger.log(self.level, "%s: %d more in the last %.0f s (%s)", self.what,
                            sum(self._suppressed.values()), now - self._window_start, counts)
        self._suppressed.clear()
        self._logged_kinds.clear()
        self._window_start = now
