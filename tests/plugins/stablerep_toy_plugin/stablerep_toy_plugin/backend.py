"""``toy-stripes``: a CPU generator backend drawing one vertical stripe pattern per caption.

Image ``j`` of a caption: that caption's stripes (colours from a hash of the caption) plus noise from
``seeds[j]``; the red channel of the top-left pixel is always 7 so that its images can be told apart.
Its facts: no weights, no sampler, host only; only the sizes change its pixels.
"""
from __future__ import annotations

import zlib

import numpy as np

from generator_service.backends.base import Backend
from generator_service.backends.facts import BackendFacts

MARK = 7  # red value of pixel (0, 0) of every image


class ToyStripesBackend(Backend):
    name = "toy-stripes"
    facts = BackendFacts(model="toy-stripes-v1", height=64, width=64, save_size=64, host_only=True)

    def _generate(self, captions: list[str], seeds: list[list[int]]) -> np.ndarray:
        """uint8 [B, m, S, S, 3]."""
        size, m = self.config.save_size, len(seeds[0])
        out = np.empty((len(captions), m, size, size, 3), dtype=np.uint8)
        for i, caption in enumerate(captions):
            palette = np.random.default_rng(zlib.crc32(caption.encode())).integers(0, 256, (4, 3))
            stripes = palette[(np.arange(size) * 4 // size)][None, :, :].repeat(size, 0)   # [S, S, 3]
            for j, seed in enumerate(seeds[i]):
                noise = np.random.default_rng(seed).normal(0, 10, stripes.shape)
                out[i, j] = np.clip(stripes + noise, 0, 255).astype(np.uint8)
        out[:, :, 0, 0, 0] = MARK
        return out
