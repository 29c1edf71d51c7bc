"""The loop's caption feedback: each step's per-caption losses, reported to the source every ``data.feedback_every`` steps.

:class:`FeedbackReporter` keeps ``metrics["caption_loss"]`` of every step with the batch's caption ids in a
:class:`~trainer.objectives.caption_difficulty.CaptionDifficulty` (on the device: no host sync), and at every
``feedback_every``-th step folds them into the per-caption moving averages (one device-to-host copy) and hands
the scores of the captions seen since the last report to ``source.send_feedback``. Every other step it calls
``source.send_feedback(None)``, so that the source can pace its messages over the steps in between.
At the default ``feedback_every`` (10) and ``log_every`` (10) the report falls on a step that reads the
loss back anyway, so it adds no wait for the device.

Built only when ``data.feedback_every`` > 0, the method declares a ``caption_score`` and the source takes
feedback (the online source); otherwise :func:`build_reporter` returns None and nothing is kept.
"""
from __future__ import annotations

from typing import Any

import torch

from trainer.objectives.caption_difficulty import CaptionDifficulty


class FeedbackReporter:
    """Per-caption difficulty of every step, reported to ``source`` every ``every`` steps."""

    def __init__(self, source: Any, every: int, decay: float) -> None:
        self.source, self.every = source, int(every)
        self.difficulty = CaptionDifficulty(decay)
        self.reports = 0

    def after_step(self, done: int, caption_ids: torch.Tensor, caption_loss: torch.Tensor | None) -> None:
        """Step ``done`` (1-based) trained on ``caption_ids`` int ``[G]`` with ``caption_loss`` float ``[G]``."""
        if caption_loss is not None:
            self.difficulty.add(caption_ids, caption_loss)
        scores = None
        if done % self.every == 0:
            scores = self.difficulty.flush()
            self.reports += 1
        self.source.send_feedback(scores)


def build_reporter(cfg: Any, method: Any, source: Any) -> FeedbackReporter | None:
    """The reporter of a run (``cfg`` a ``TrainConfig``), or None when no feedback is sent."""
    if cfg.data.feedback_every == 0 or getattr(method, "caption_score", None) is None:
        return None
    if not callable(getattr(source, "send_feedback", None)):
        return None
    return FeedbackReporter(source, cfg.data.feedback_every, cfg.data.feedback_decay)
