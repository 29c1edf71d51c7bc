"""The backend interface: captions and per-image seeds in, uint8 image groups out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np

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

    def __init__(self, config: "GeneratorConfig", device: str = "cpu") -> None:
        self.config = config
        self.device = device

    def generate(self, captions: list[str], seeds: list[list[int]]) -> np.ndarray:
        """Validate the request, run the backend, check the result. Returns uint8 [B, m, S, S, 3]."""
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
        seeds = [[int(s) for s in group] for group in seeds]
        images = self._generate(captions, seeds)
        size = self.config.save_size
        expected = (len(captions), m, size, size, 3)
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
