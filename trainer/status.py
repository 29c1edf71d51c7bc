"""Plain-text status lines of a training run: to ``RUN/train.log`` always, to stdout without a bar.

One line every ``interval`` seconds (and at the first and last step)::

    step 40/200 (20%) | loss 3.8123 | lr 1.00e-03 | 152.3 img/s | reuse 1.84 | fresh 0.25 | stall 0.0s (0%) | ETA 1m05s

Fields: ``step`` optimizer steps done / total; ``loss`` the last step's training loss; ``lr`` the
learning rate of that step; ``img/s`` images per second over all processes since the previous line;
``reuse`` mean draws per group in the replay buffer (online source; 1 = every group used once);
``fresh`` share of never-drawn groups in the last batch (online); ``stall`` seconds the trainer waited
for generators in total (online; waits for the replay buffer's rate contract included), and in brackets
the trainer's stall ratio: the share of the time since the previous line that the draws waited (the next
batch is drawn while a step runs, so part of a wait may overlap it); ``ETA`` time left at the current
speed. Fields a source does not report are left out. The generators' own idle time is not on the wire:
their status lines and metrics report it (``idle (queue full)``).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import IO, Any, Mapping


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def status_line(step: int, total: int, loss: float, lr: float, images_per_s: float, eta_s: float | None,
                source_stats: Mapping[str, Any], stall_ratio: float | None = None) -> str:
    parts = [f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)", f"loss {loss:.4f}", f"lr {lr:.2e}",
             f"{images_per_s:.1f} img/s"]
    if "reuse_mean" in source_stats:
        parts.append(f"reuse {float(source_stats['reuse_mean']):.2f}")
    if "fresh_fraction_last" in source_stats:
        parts.append(f"fresh {float(source_stats['fresh_fraction_last']):.2f}")
    if "stall_seconds" in source_stats:
        ratio = f" ({100 * stall_ratio:.0f}%)" if stall_ratio is not None else ""
        parts.append(f"stall {float(source_stats['stall_seconds']):.1f}s{ratio}")
    parts.append(f"ETA {format_duration(eta_s) if eta_s is not None else '?'}")
    return " | ".join(parts)


def stall_ratio(stalled_s: float, elapsed_s: float) -> float:
    """Share of ``elapsed_s`` seconds spent in ``stalled_s`` seconds of waiting, in [0, 1]."""
    return min(1.0, max(0.0, stalled_s / elapsed_s)) if elapsed_s > 0 else 0.0


class StatusLog:
    """Writes status lines every ``interval`` seconds to ``log_path`` and, if ``echo``, to ``stream``.

    ``note(text)`` writes any other line (banner, resume, end) the same way, immediately.
    """

    def __init__(self, log_path: Path | None, interval: float, echo: bool, stream: IO[str] | None = None) -> None:
        self.interval, self.echo = float(interval), echo
        self.stream = stream if stream is not None else sys.stdout
        self._file = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(log_path, "a", encoding="utf-8")
        self._last_time: float | None = None
        self._last_step = 0
        self._wrote = False
        self._last_stall: float | None = None  # the source's stall seconds at the previous line

    def note(self, text: str, echo: bool | None = None) -> None:
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}"
        if self._file is not None:
            self._file.write(stamped + "\n")
            self._file.flush()
        if self.echo if echo is None else echo:
            print(stamped, file=self.stream, flush=True)

    def start(self, step: int, stall_seconds: float | None = None) -> None:
        """The clock of the first line starts here (call before the first step); ``stall_seconds``: the
        source's stall counter now (the first line's stall ratio counts from it)."""
        self._last_time, self._last_step = time.perf_counter(), step
        self._last_stall = stall_seconds

    def step(self, step: int, total: int, loss: float, lr: float, images_per_step: int,
             source_stats_fn, force: bool = False) -> None:
        """Called after every step; writes a line when ``interval`` has passed (or ``force``)."""
        now = time.perf_counter()
        if self._last_time is None:
            self.start(step - 1)
        elapsed = now - self._last_time
        first = not self._wrote
        if not (force or first or elapsed >= self.interval):
            return
        done = step - self._last_step
        images_per_s = images_per_step * done / elapsed if elapsed > 0 and done > 0 else 0.0
        eta = (total - step) * elapsed / done if done > 0 else None
        stats = source_stats_fn()
        stall = stats.get("stall_seconds")
        ratio = None
        if stall is not None and self._last_stall is not None and elapsed > 0:
            ratio = stall_ratio(float(stall) - self._last_stall, elapsed)
        self.note(status_line(step, total, loss, lr, images_per_s, eta, stats, ratio))
        self._last_time, self._last_step, self._wrote = now, step, True
        self._last_stall = float(stall) if stall is not None else None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
