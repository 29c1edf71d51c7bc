"""Learning-rate schedule by step: linear warmup, then cosine decay to ``min_lr``; :class:`LrSchedule`
holds one run's schedule, including how it goes on after a resume that changed the run length."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields


def lr_at(step: int, *, peak_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based, the step about to be taken).

    Warmup: ``peak_lr * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (so step 0 is not
    wasted at lr 0, and the last warmup step reaches ``peak_lr``). Then a half cosine from
    ``peak_lr`` at ``step = warmup_steps`` down to ``min_lr`` at ``step = total_steps``; steps past
    the end stay at ``min_lr``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LrSchedule:
    """The lr of every step of one run: :func:`lr_at`, or, after a resume that changed the run
    length (``from_step`` set), a new half cosine from ``from_lr`` at ``from_step`` down to
    ``min_lr`` at ``total_steps`` (so the lr goes on from where the checkpoint left it, no jump).

    Saved in every checkpoint (``trainer_state.json["lr_schedule"]``) so that a later resume keeps it.
    """

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0
    from_step: int | None = None
    from_lr: float | None = None

    def __call__(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based, the step about to be taken)."""
        if self.from_step is None or self.from_lr is None or step < self.from_step:
            return lr_at(step, peak_lr=self.peak_lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                         min_lr=self.min_lr)
        span = self.total_steps - self.from_step
        progress = min(1.0, (step - self.from_step) / span) if span > 0 else 1.0
        return self.min_lr + 0.5 * (self.from_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LrSchedule":
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
