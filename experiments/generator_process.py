"""The generator service as the experiments run it: ``stablerep-generator`` subcommands to completion
(captions, probe sets, offline shards) and the service itself as a subprocess for the length of a run.

The subprocess gets the project on its ``PYTHONPATH``, one BLAS thread, and a lower CPU priority
(the trainer in the parent needs the cores).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

GENERATOR_NICENESS = 10
GENERATOR_MODULE = "generator_service.cli"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _generator_env() -> dict[str, str]:
    """The subprocess environment: the project importable, one BLAS thread (the trainer needs the cores)."""
    env = dict(os.environ)
    if (PROJECT_ROOT / "generator_service").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    return env


def _lower_priority() -> None:
    """In the generator subprocess: yield the CPU to the trainer (the procedural backend renders far
    faster than a CPU trainer consumes, and the replay buffer absorbs the surplus)."""
    os.nice(GENERATOR_NICENESS)


def run_generator_cli(args: list[str], timeout: float = 300.0) -> str:
    """Run ``stablerep-generator ARGS`` to completion in a subprocess; its stdout, or an error with its stderr."""
    command = [sys.executable, "-m", GENERATOR_MODULE, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_generator_env())
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout


class GeneratorProcess:
    """The generator service as a subprocess (own process group, output to ``log_path``).

    Leaving the ``with`` block always stops it: SIGTERM (the service drains and exits), then after
    ``stop_timeout`` seconds SIGKILL to its whole process group (worker processes included).
    """

    def __init__(self, args: list[str], log_path: Path, stop_timeout: float = 20.0) -> None:
        self.command = [sys.executable, "-m", GENERATOR_MODULE, *args]
        self.log_path, self.stop_timeout = Path(log_path), stop_timeout
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.pid: int | None = None

    def __enter__(self) -> "GeneratorProcess":
        self._log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                         env=_generator_env(), start_new_session=True,
                                         preexec_fn=_lower_priority if hasattr(os, "nice") else None)
        except BaseException:
            self._log.close()
            raise
        self.pid = self.proc.pid
        return self

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"the generator service exited with status {self.proc.returncode}; "
                               f"log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            try:  # the group: the service and any worker it left behind
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.wait(10)
            self.returncode = proc.returncode

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self._log.close()
