"""``--gpus`` device specs: which devices get a worker process.

Accepted forms (one worker per listed device):

- ``0-3`` -> cuda:0 .. cuda:3; ``0,2`` -> cuda:0, cuda:2; ``0-1,4`` mixes both; ``cuda:1`` is one GPU.
- ``cpu`` -> one CPU worker; ``cpu:N`` -> N CPU workers.
- ``auto`` -> every visible CUDA device, or one CPU worker when there is none.

GPU indices are indices among the visible devices (``CUDA_VISIBLE_DEVICES`` applies).
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager

MAX_CPU_WORKERS = 64
_RANGE = re.compile(r"^(\d+)-(\d+)$")


class DeviceSpecError(ValueError):
    """A ``--gpus`` value that cannot be parsed or names a device that does not exist."""


def _fail(spec: str, why: str) -> DeviceSpecError:
    return DeviceSpecError(
        f"--gpus {spec!r}: {why} (expected e.g. '0-3', '0,2', 'cpu', 'cpu:2' or 'auto')"
    )


def parse_devices(spec: str, cuda_count: int | None = None) -> list[str]:
    """Turn a ``--gpus`` spec into torch device strings, one per worker.

    Args:
        spec: the spec (see module docstring).
        cuda_count: visible CUDA devices; when given, GPU indices are checked against it
            (and ``auto`` uses it). ``None`` skips the check and makes ``auto`` mean one CPU worker.
    Returns: e.g. ``["cuda:0", "cuda:2"]`` or ``["cpu", "cpu"]``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _fail(str(spec), "empty device spec")
    text = spec.strip().lower()
    if text == "auto":
        return [f"cuda:{i}" for i in range(cuda_count)] if cuda_count else ["cpu"]
    if text == "cpu":
        return ["cpu"]
    if text.startswith("cpu:"):
        count = text[4:]
        if not count.isdigit() or not 1 <= int(count) <= MAX_CPU_WORKERS:
            raise _fail(spec, f"cpu:N needs an integer N in [1, {MAX_CPU_WORKERS}], got {count!r}")
        return ["cpu"] * int(count)
    indices: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if part.startswith("cuda:"):
            part = part[5:]
        match = _RANGE.match(part)
        if match:
            first, last = int(match.group(1)), int(match.group(2))
            if first > last:
                raise _fail(spec, f"range {part!r} runs backwards")
            indices.extend(range(first, last + 1))
        elif part.isdigit():
            indices.append(int(part))
        else:
            raise _fail(spec, f"{part!r} is not a GPU index or range")
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        raise _fail(spec, f"GPU {duplicates[0]} is listed twice")
    if cuda_count is not None:
        if cuda_count == 0:
            raise _fail(spec, "no CUDA device is visible on this machine; use --gpus cpu or cpu:N")
        missing = [i for i in indices if i >= cuda_count]
        if missing:
            raise _fail(spec, f"GPU {missing[0]} does not exist: {cuda_count} CUDA device(s) visible (0-{cuda_count - 1})")
    return [f"cuda:{i}" for i in indices]


def visible_cuda_count() -> int:
    """Number of CUDA devices torch sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextmanager
def worker_device_env(device: str):
    """While a worker process is spawned for ``device``, show it only its own GPU.

    The child inherits the environment at spawn, so its ``CUDA_VISIBLE_DEVICES`` names that one GPU
    (mapped through the parent's own ``CUDA_VISIBLE_DEVICES``, if set); yields the device the worker
    uses in its process: ``cuda:0``, or ``cpu``.
    """
    if not device.startswith("cuda"):
        yield "cpu"
        return
    index = int(device.split(":")[1]) if ":" in device else 0
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [v.strip() for v in before.split(",")] if before else None
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if visible and index < len(visible) else str(index)
    try:
        yield "cuda:0"
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before
