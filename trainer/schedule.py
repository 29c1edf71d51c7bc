"""Learning-rate schedule by step: linear warmup, then cosine decay to ``min_lr``."""
from __future__ import annotations

import math


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
