"""The rate contract between the generators and the trainer: at most R draws per inserted group, plus E.

Reverb's ``SampleToInsertRatio`` for the replay buffer. ``samples_per_insert`` (R) is how many times the
trainer may draw each inserted group on average; ``tolerance`` (E) is how many draws it may run ahead of
that. A batch of ``G`` groups may be drawn when::

    draws + G <= R * inserts + E

(``draws``: groups drawn so far, ``inserts``: groups added so far), so a draw blocks while the draws,
counting its own, would exceed ``R x inserts + E``, and the buffer's ``sample`` waits, counting the wait
as stall time, until enough groups arrive. Only draws wait: an insert never does (the generators are
paced by their credits, and a surplus group is evicted, counted as ``evicted_unused``). With
``E < G`` and no inserts a draw would wait forever: the buffer's first batch needs ``G`` groups
inserted anyway, so keep ``E >= 0`` and, to let the first batch through as soon as it is there,
``R * G + E >= G``.

The contract holds the arithmetic only; the buffer checks it under its own lock, with its own counters
(``trainer.data.replay``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RateContract:
    """``draws + batch <= samples_per_insert * inserts + tolerance``.

    Args:
        samples_per_insert: R > 0, draws allowed per inserted group.
        tolerance: E >= 0, draws allowed beyond ``R x inserts``.
    """

    samples_per_insert: float
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        r, e = self.samples_per_insert, self.tolerance
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
            raise ValueError(f"samples_per_insert must be a finite number > 0, got {r!r}")
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e < 0:
            raise ValueError(f"spi tolerance must be a finite number >= 0, got {e!r}")

    def draws_allowed(self, inserts: int) -> float:
        """Most groups that may have been drawn after ``inserts`` inserts: ``R x inserts + E``."""
        return self.samples_per_insert * inserts + self.tolerance

    def allows(self, draws: int, batch: int, inserts: int) -> bool:
        """Whether a batch of ``batch`` groups may be drawn after ``draws`` draws and ``inserts`` inserts."""
        return draws + batch <= self.draws_allowed(inserts) + 1e-9 * max(1.0, abs(draws + batch))

    def inserts_needed(self, draws: int, batch: int, inserts: int) -> int:
        """How many more inserts let that batch be drawn (0 when it may be drawn now)."""
        missing = (draws + batch - self.draws_allowed(inserts)) / self.samples_per_insert
        extra = max(0, math.ceil(missing - 1e-9))
        while not self.allows(draws, batch, inserts + extra):  # float rounding of R: the exact count
            extra += 1
        return extra

    def describe(self) -> str:
        return f"at most {self.samples_per_insert:g} draws per inserted group, plus {self.tolerance:g}"

    def waited(self, timeout: float | None, draws: float, batch: int, inserts: float) -> str:
        """The message of a draw that waited ``timeout`` seconds for the contract in vain."""
        draws, inserts = int(draws), int(inserts)
        return (f"ReplayBuffer.sample waited {timeout}s for the rate contract ({self.describe()}): {draws} groups "
                f"drawn and {inserts} inserted; {batch} more draws need {self.inserts_needed(draws, batch, inserts)} "
                "more inserts. Are the generators producing?")
