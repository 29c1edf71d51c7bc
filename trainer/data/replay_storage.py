"""Where the replay buffer's storage lives, and how host storage is pinned.

Storage rule (``storage="auto"``): the buffer lives in GPU memory when it fits beside training:
the memory this process can use (free memory plus what its allocator already holds) minus the
training step's own peak (``training_bytes``: weights, gradients, AdamW moments and activations,
from :func:`trainer.preflight.estimate_memory` on a meta-device model) minus a headroom of
``GPU_HEADROOM_FRACTION`` of the card (CUDA context, NCCL buffers, compile workspaces,
fragmentation). Otherwise it lives in pinned host memory. The decision is taken when the buffer is
allocated, which can be before the optimizer state and activations exist: hence the estimate.

Pinned host storage is allocated as ordinary memory and then page-locked exactly
(``cudaHostRegister``). ``torch.empty(..., pin_memory=True)`` goes through the caching host
allocator, which rounds every block up to a power of two (a 21.6 GB buffer would lock 32 GiB).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

#: share of the card's memory left free by the auto rule, beyond the training estimate
GPU_HEADROOM_FRACTION = 0.10


def gpu_storage_fits(nbytes: int, *, free: int, total: int, held: int, training_bytes: int) -> bool:
    """Whether a ``nbytes`` buffer fits on the GPU beside training (all arguments in bytes).

    ``free``/``total``: ``torch.cuda.mem_get_info``; ``held``: what this process's allocator
    already reserves (its own model weights, say), which the training estimate counts too.
    """
    budget = free + held - training_bytes - GPU_HEADROOM_FRACTION * total
    return nbytes <= budget


def choose_storage_device(storage: str, device: torch.device, nbytes: int, training_bytes: int = 0) -> torch.device:
    """Apply the storage rule of the module docstring; returns the storage device."""
    if storage == "host" or device.type != "cuda":
        if storage == "gpu" and device.type != "cuda":
            raise ValueError(f"replay storage 'gpu' needs a CUDA training device, got {device}")
        return torch.device("cpu")
    if storage == "gpu":
        return device
    free, total = torch.cuda.mem_get_info(device)
    held = torch.cuda.memory_reserved(device)
    if gpu_storage_fits(nbytes, free=free, total=total, held=held, training_bytes=training_bytes):
        return device
    log.info("replay buffer of %.2f GiB in pinned host memory: beside the training estimate of %.2f GiB it does "
             "not fit the %.2f GiB free on %s", nbytes / 2**30, training_bytes / 2**30, free / 2**30, device)
    return torch.device("cpu")


class PinnedHostStorage:
    """A uint8 host tensor of ``shape``, page-locked byte for byte (no power-of-two round-up).

    ``tensor`` is the storage; :meth:`release` unpins it (also on garbage collection). Without CUDA
    the tensor is plain host memory and ``pinned`` is False.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.tensor = torch.empty(shape, dtype=torch.uint8)
        self.pinned = False
        if self.tensor.numel() and torch.cuda.is_available():
            cudart: Any = torch.cuda.cudart()
            code = cudart.cudaHostRegister(self.tensor.data_ptr(), self.tensor.numel(), 0)
            if int(code) != 0:
                raise RuntimeError(f"cudaHostRegister of {self.tensor.numel()} bytes of replay storage failed "
                                   f"(CUDA error {int(code)}): lower --replay-gib or use --replay-storage gpu")
            self.pinned = True

    def release(self) -> None:
        if self.pinned:
            self.pinned = False
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())

    def __del__(self) -> None:  # pragma: no cover - depends on the collector
        try:
            self.release()
        except Exception:
            pass


def allocate_storage(shape: tuple[int, ...], device: torch.device, pin: bool) -> tuple[torch.Tensor, Any]:
    """uint8 storage of ``shape`` on ``device``; host storage pinned exactly when ``pin``.

    Returns ``(tensor, keeper)``: ``keeper`` owns the page lock (call ``keeper.release()`` when done;
    None when nothing is pinned).
    """
    if device.type != "cpu" or not pin:
        return torch.empty(shape, dtype=torch.uint8, device=device), None
    keeper = PinnedHostStorage(shape)
    return keeper.tensor, keeper
