"""The backend interface: captions and per-image seeds in, uint8 image groups out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from generator_service.backends.facts import BackendFacts

if TYPE_CHECKING:
    from generator_service.config import GeneratorConfig

MAX_SEED = 2**64  # seeds are unsigned 64-bit integers (image_seed gives 63-bit ones)


class Backend(ABC):
    """Turns caption groups into images.

    ``generate(captions, seeds)`` takes B captions and, for each, m seeds (one per image) and returns
    uint8 ``[B, m, S, S, 3]`` (C-contiguous, RGB), S = ``config.save_size``. Image ``j`` of caption
    ``i`` depends only on the config, ``captions[i]`` and ``seeds[i][j]``, never on the batch.
    """

    name: str = "base"
    #: what the backend is, readable without building it (config defaults, fingerprint fields, needs);
    #: every registered backend sets its own (`generator_service.backends.facts`)
    facts: ClassVar[BackendFacts | None] = None
    #: the backend wants every batch at the worker's full size (a compiled model: one shape)
    static_batch: bool = False

    def __init__(self, config: "GeneratorConfig", device: str = "cpu") -> None:
        self.config = config
        self.device = device

    def generate(self, captions: list[str], seeds: list[list[int]]) -> np.ndarray:
        """Validate the request, run the backend, check the result. Returns uint8 [B, m, S, S, 3]."""
        captions, seeds = self.check_request(captions, seeds)
        return self.check_result(self._generate(captions, seeds), len(captions), len(seeds[0]))

    def submit(self, captions: list[str], seeds: list[list[int]], done: Callable[[np.ndarray], None],
               failed: Callable[[BaseException], None]) -> None:
        """Start a batch; ``done(images)`` (uint8 [B, m, S, S, 3]) or ``failed(exc)`` is called when it is finished.

        Batches finish in submission order. A bad request raises here. This default finishes the
        batch before returning; backends that overlap the end of one batch with the next
        override it (and ``drain``), calling the callbacks from their own thread.
        """
        images = self.generate(captions, seeds)
        done(images)

    def drain(self) -> None:
        """Until every submitted batch has been handed to its callback."""
        return None  # the default submit finishes inline: nothing is pending

    def check_request(self, captions: list[str], seeds: list[list[int]]) -> tuple[list[str], list[list[int]]]:
        """The validated request: captions as a list, seeds as lists of Python ints."""
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, not one string")
        captions = list(captions)
        seeds = [list(group) for group in seeds]
        if not captions:
            raise ValueError("generate() needs at least one caption")
        if len(seeds) != len(captions):
            raise ValueError(f"got {len(captions)} captions but {len(seeds)} seed lists")
        m = len(seeds[0])
        for i, (caption, group) in enumerate(zip(captions, seeds)):
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"caption {i} must be a non-empty string, got {caption!r}")
            if len(group) != m or m == 0:
                raise ValueError(f"every caption needs the same number (>= 1) of seeds; caption {i} has {len(group)}, caption 0 has {m}")
            for seed in group:
                if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < MAX_SEED:
                    raise ValueError(f"seed {seed!r} of caption {i} is not an integer in [0, 2**64)")
        return captions, [[int(s) for s in group] for group in seeds]

    def check_result(self, images: np.ndarray, b: int, m: int) -> np.ndarray:
        """``images`` if they are uint8 [b, m, S, S, 3] (made C-contiguous), else a RuntimeError."""
        size = self.config.save_size
        expected = (b, m, size, size, 3)
        if images.shape != expected or images.dtype != np.uint8:
            raise RuntimeError(
                f"backend {self.name!r} returned {images.dtype} {images.shape}, expected uint8 {expected}"
            )
        return np.ascontiguousarray(images)

    @abstractmethod
    def _generate(self, captions: list[str], seeds: list[list[int]]) -> np.ndarray:
        """Backend-specific generation on validated input; returns uint8 [B, m, S, S, 3]."""

    def close(self) -> None:  # noqa: B027 - optional hook; backends holding nothing need not override it
        """Release what the backend holds (GPU memory, pipelines)."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
