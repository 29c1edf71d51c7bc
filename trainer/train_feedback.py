"""The loop's caption feedback: each step's per-caption losses, reported to the source every ``data.feedback_every`` steps.

:class:`FeedbackReporter` keeps ``metrics["caption_loss"]`` of every step with the batch's caption ids in a
:class:`~trainer.objectives.caption_difficulty.CaptionDifficulty` (on the device: no host sync), and at every
``feedback_every``-th step folds them into the per-caption moving averages (one device-to-host copy) and hands
the scores of the captions seen since the last report to ``source.send_feedback``. Every other step it calls
``source.send_feedback(None)``, so that the source can pace its messages over the steps in between.
At the default ``feedback_every`` (10) and ``log_every`` (10) the report falls on a step that reads the
loss back anyway, so it adds no wait for the device.

The averages are part of every checkpoint: each process's ``source_state_{rank}.json`` holds its reporter's
under ``caption_difficulty`` (:func:`with_difficulty`; the steps not folded yet are folded first and their
captions still go in the next report), and a resume restores them (:func:`split_difficulty`), so the scores
go on from where they were instead of starting over.

Built only when ``data.feedback_every`` > 0, the method declares a ``caption_score`` and the source takes
feedback (the online source); otherwise :func:`build_reporter` returns None and nothing is kept.
"""
from __future__ import annotations

from typing import Any

import torch

from trainer.objectives.caption_difficulty import CaptionDifficulty

#: Key of the reporter's averages in a checkpoint's source state.
DIFFICULTY_KEY = "caption_difficulty"


class FeedbackReporter:
    """Per-caption difficulty of every step, reported to ``source`` every ``every`` steps."""

    def __init__(self, source: Any, every: int, decay: float) -> None:
        self.source, self.every = source, int(every)
        self.difficulty = CaptionDifficulty(decay)
        self.reports = 0
        self._unreported: dict[int, float] = {}  # folded for a checkpoint before their report

    def after_step(self, done: int, caption_ids: torch.Tensor, caption_loss: torch.Tensor | None) -> None:
        """Step ``done`` (1-based) trained on ``caption_ids`` int ``[G]`` with ``caption_loss`` float ``[G]``."""
        if caption_loss is not None:
            self.difficulty.add(caption_ids, caption_loss)
        scores = None
        if done % self.every == 0:
            scores = {**self._unreported, **self.difficulty.flush()}
            self._unreported = {}
            self.reports += 1
        self.source.send_feedback(scores)

    def state_dict(self) -> dict[str, Any]:
        """The per-caption averages, the steps not folded yet included (one device-to-host copy)."""
        self._unreported.update(self.difficulty.flush())
        return self.difficulty.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from saved averages (``state_dict``)."""
        self.difficulty.load_state_dict(state)
        self._unreported = {}


def build_reporter(cfg: Any, method: Any, source: Any, saved: dict[str, Any] | None = None) -> FeedbackReporter | None:
    """The reporter of a run (``cfg`` a ``TrainConfig``), or None when no feedback is sent; ``saved``: the
    averages a resumed checkpoint holds (:func:`split_difficulty`)."""
    if cfg.data.feedback_every == 0 or getattr(method, "caption_score", None) is None:
        return None
    if not callable(getattr(source, "send_feedback", None)):
        return None
    reporter = FeedbackReporter(source, cfg.data.feedback_every, cfg.data.feedback_decay)
    if saved is not None:
        reporter.load_state_dict(saved)
    return reporter


def with_difficulty(source_state: Any, reporter: FeedbackReporter | None) -> Any:
    """The source state a checkpoint saves for this process: the source's, plus the reporter's averages."""
    if reporter is None or not isinstance(source_state, dict):
        return source_state
    return {**source_state, DIFFICULTY_KEY: reporter.state_dict()}


def split_difficulty(saved: Any, rank: int) -> tuple[Any, dict[str, Any] | None]:
    """A checkpoint's source state (``trainer.checkpoint.load_source_state``) -> (the source's own state,
    the averages of process ``rank``'s reporter or None). A layout-independent state (``{"ranks": [...]}``)
    holds each saving process's: ``rank``'s is taken when there is one."""
    if not isinstance(saved, dict):
        return saved, None
    if isinstance(saved.get("ranks"), list):
        ranks = [dict(r) if isinstance(r, dict) else r for r in saved["ranks"]]
        found = [r.pop(DIFFICULTY_KEY, None) if isinstance(r, dict) else None for r in ranks]
        return {**saved, "ranks": ranks}, found[rank] if rank < len(found) else None
    own = dict(saved)
    return own, own.pop(DIFFICULTY_KEY, None)
