"""The offline sample stream: which rank reads which sample, independent of the layout.

All epochs form one global stream of positions ``t = 0, 1, 2, ...``: position ``t`` is sample
``epoch_order(N, t // N)[t % N]`` (one global permutation of all ``N`` samples per epoch, seeded by
``(seed, epoch)``). A :class:`StreamBasis` says where reading (re)starts: every position before
``start`` and every position in ``skip`` has been read already. The positions still to read are
numbered ``u = 0, 1, 2, ...`` in stream order, and rank ``r`` of ``W`` reads those with
``u % W == r``; DataLoader worker ``w`` of ``K`` reads every ``K``-th of its rank's positions.

Every rank takes the same number of positions per step (whole batches), so whatever a run read is
"all ``u`` below some bound, plus a few more" (a rank that skipped a corrupt sample took one more).
:func:`merge_progress` turns what every rank of a saved run read into a new basis, which any world
size and worker count resume from: within the interrupted epoch every sample is then read exactly
once. No epoch is padded (DistributedSampler repeats samples to fill the last round; here a rank
that runs out of an epoch continues into the next), so no sample is read twice in an epoch either.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np


def epoch_order(num_samples: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """The order of all samples in ``epoch`` (identical on every rank and worker)."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


@dataclass
class StreamBasis:
    """Where reading starts: positions ``< start`` and those in ``skip`` (sorted, all ``> start``)
    are read; the rest is split over ``world_size`` ranks."""

    start: int = 0
    skip: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"start": int(self.start), "skip": [int(s) for s in self.skip], "world_size": int(self.world_size)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StreamBasis":
        return cls(int(data["start"]), np.asarray(sorted(int(s) for s in data.get("skip", [])), dtype=np.int64),
                   int(data["world_size"]))

    def position(self, u: np.ndarray | int) -> np.ndarray:
        """Stream position of the ``u``-th position still to read."""
        t = self.start + np.asarray(u, dtype=np.int64)
        for s in self.skip:  # ascending: each skipped position shifts everything at or after it
            t = t + (t >= s)
        return t

    def rank_positions(self, epoch: int, num_samples: int, rank: int) -> np.ndarray:
        """The stream positions rank ``rank`` reads inside ``epoch``, in order."""
        lo, hi = max(self.start, epoch * num_samples), (epoch + 1) * num_samples
        if lo >= hi:
            return np.zeros(0, dtype=np.int64)
        first_u = (lo - self.start) - int(np.searchsorted(self.skip, lo))  # number of positions to read before lo
        inside = self.skip[(self.skip >= lo) & (self.skip < hi)]
        if len(inside) == 0:
            return np.arange(lo + (rank - first_u) % self.world_size, hi, self.world_size, dtype=np.int64)
        positions = np.setdiff1d(np.arange(lo, hi, dtype=np.int64), inside, assume_unique=True)
        return positions[(first_u + np.arange(len(positions))) % self.world_size == rank]

    def first_epoch(self, num_samples: int) -> int:
        return int(self.start // num_samples)


def merge_progress(basis: StreamBasis, consumed: Sequence[int], world_size: int) -> StreamBasis:
    """The basis, for ``world_size`` ranks, after rank ``r`` read its first ``consumed[r]`` positions
    under ``basis``.

    Raises:
        ValueError: ``consumed`` does not have one entry per rank of ``basis``.
    """
    W = basis.world_size
    if len(consumed) != W:
        raise ValueError(f"offline resume state: progress of {len(consumed)} ranks, the saving run had {W}")
    next_u = [r + W * int(k) for r, k in enumerate(consumed)]  # first position each rank has not read
    bound = min(next_u)
    extra_u = [r + W * j for r, k in enumerate(consumed) for j in range(-(-(bound - r) // W), int(k)) if r + W * j > bound]
    new_start = int(basis.position(bound))
    extra = basis.position(np.asarray(sorted(extra_u), dtype=np.int64)) if extra_u else np.zeros(0, dtype=np.int64)
    kept = basis.skip[basis.skip > new_start]
    skip = np.unique(np.concatenate([kept, extra]).astype(np.int64))
    return StreamBasis(new_start, skip, int(world_size))
