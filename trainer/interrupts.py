"""Honest stops for long-running commands (``stablerep-bench demo`` and ``study``, ``stablerep-eval``).

SIGINT already raises ``KeyboardInterrupt`` in Python; :class:`StopSignals` makes SIGTERM do the same
(main thread only) and remembers which signal came, so a command can stop where it is, keep what it
finished, say where it stopped in one line, and exit :data:`EXIT_INTERRUPTED`. While
``trainer.loop.train`` runs, the trainer's own handler takes both signals (it finishes the step and
checkpoints) and gives them back afterwards.
"""
from __future__ import annotations

import signal
import threading
from typing import Any

#: exit status of a command stopped by SIGINT / SIGTERM (128 + SIGINT, the shell's convention)
EXIT_INTERRUPTED = 130


class _SignalScope:
    """Installs ``self._handle`` (each subclass says what a signal does) for SIGINT and SIGTERM inside
    ``with`` (main thread only) and gives the previous handlers back on exit."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StopSignals(_SignalScope):
    """Inside ``with StopSignals() as stop``: SIGINT and SIGTERM raise ``KeyboardInterrupt``;
    ``stop.name`` is the last signal's name ("SIGINT"), ``None`` before any."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str | None = None

    def _handle(self, signum: int, frame) -> None:
        self.name = signal.Signals(signum).name
        raise KeyboardInterrupt

    def describe(self, default: str = "SIGINT") -> str:
        return self.name or default


class StopAfterStep(_SignalScope):
    """The training loop's handler: the first SIGINT/SIGTERM is remembered in ``signal`` (the loop
    finishes its step, checkpoints and stops); a second one raises ``KeyboardInterrupt`` at once."""

    def __init__(self) -> None:
        super().__init__()
        self.signal: int | None = None

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum


class Progress:
    """Where a long command is, in words, for the one line it prints when stopped.

    ``phase`` is a short name ("data", "training", "probes"); ``detail`` says more ("probe 3/8:
    snapshot step 50, attribute shape").
    """

    def __init__(self, phase: str = "setup", detail: str = "") -> None:
        self.phase, self.detail = phase, detail

    def enter(self, phase: str, detail: str = "") -> None:
        self.phase, self.detail = phase, detail

    def where(self) -> str:
        return f"the {self.phase} phase" + (f" ({self.detail})" if self.detail else "")

    def as_dict(self) -> dict[str, str]:
        return {"phase": self.phase, "detail": self.detail}
