"""Per-caption difficulty: a moving average of each caption's loss, the score the trainer sends the generators.

A method with a ``caption_score`` (``trainer.objectives.methods``) reports ``metrics["caption_loss"]``
every step: float ``[G]``, the mean per-anchor loss of each group, on the device. :meth:`CaptionDifficulty.add`
keeps it there (with the batch's caption ids) and does not wait for the device; :meth:`CaptionDifficulty.flush`,
called at feedback steps only, copies what was kept to the host in one transfer and folds it, step by step
in order, into one exponential moving average per caption id::

    batch value = mean loss of the caption's views in that step (several groups of one caption: the mean of
                  their means; every group of a step has as many views, so this is the mean over its views)
    score <- batch value                                   the caption's first step
    score <- decay * score + (1 - decay) * batch value     every later step it appears in

Folding late gives the same scores as folding every step: each caption's average only depends on its own
values, in step order.

``DEFAULT_DECAY`` = 0.8: a caption is seen only in the steps that draw one of its groups (a group is drawn a
handful of times while it is in the replay buffer), so the score follows about its last five values. That
averages out the noise of one draw (other negatives, other crops) and still follows the model as it learns;
at 0.99 a score would mostly be the caption's first value, at 0.5 mostly its last one.

The table keeps the ``max_captions`` most recently seen captions (the least recently seen one is forgotten
first), so a run over millions of captions holds a bounded amount of memory.
"""
from __future__ import annotations

import collections
from typing import Any

import numpy as np
import torch

#: Weight of a caption's previous score in its moving average (module docstring says why).
DEFAULT_DECAY = 0.8
#: Captions whose scores are kept; beyond it the least recently seen caption is forgotten.
MAX_TRACKED_CAPTIONS = 1 << 18


class CaptionDifficulty:
    """Moving average of the loss of each caption id, fed without host syncs, read at feedback steps.

    Args:
        decay: weight of the previous score, in [0, 1) (0: the last value alone).
        max_captions: captions kept (least recently seen forgotten first), >= 1.
    """

    def __init__(self, decay: float = DEFAULT_DECAY, max_captions: int = MAX_TRACKED_CAPTIONS) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"caption difficulty decay must be in [0, 1), got {decay}")
        if max_captions < 1:
            raise ValueError(f"max_captions must be >= 1, got {max_captions}")
        self.decay = float(decay)
        self.max_captions = int(max_captions)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (caption ids [G], loss [G]) per step
        self._scores: collections.OrderedDict[int, float] = collections.OrderedDict()  # least recent first

    @property
    def pending_steps(self) -> int:
        """Steps added since the last :meth:`flush`."""
        return len(self._pending)

    def add(self, caption_ids: torch.Tensor, caption_loss: torch.Tensor) -> None:
        """Keep one step's values, where they are (no host sync).

        Args:
            caption_ids: int ``[G]``, the batch's caption ids (host or device).
            caption_loss: float ``[G]``, the method's ``metrics["caption_loss"]`` (detached).
        """
        if caption_ids.shape != caption_loss.shape or caption_ids.dim() != 1:
            raise ValueError(f"caption_ids {tuple(caption_ids.shape)} and caption_loss {tuple(caption_loss.shape)} "
                             "must both be [G]")
        self._pending.append((caption_ids.detach(), caption_loss.detach()))

    def flush(self) -> dict[int, float]:
        """Fold the kept steps into the averages (one device-to-host copy of ids and values).

        Returns:
            ``{caption id: score}`` of every caption seen since the last flush.
        """
        if not self._pending:
            return {}
        sizes = [int(ids.shape[0]) for ids, _ in self._pending]
        all_ids = torch.cat([ids.to(torch.int64) for ids, _ in self._pending]).cpu().numpy()
        losses = torch.cat([loss.to(torch.float64) for _, loss in self._pending]).cpu().numpy()
        self._pending.clear()
        seen: dict[int, float] = {}
        start = 0
        for size in sizes:
            ids, values = all_ids[start:start + size], losses[start:start + size]
            start += size
            unique, inverse = np.unique(ids, return_inverse=True)
            means = np.bincount(inverse, weights=values) / np.bincount(inverse)
            for caption_id, value in zip(unique.tolist(), means.tolist()):
                seen[caption_id] = self._fold(caption_id, value)
        while len(self._scores) > self.max_captions:
            forgotten, _ = self._scores.popitem(last=False)
            seen.pop(forgotten, None)
        return seen

    def _fold(self, caption_id: int, value: float) -> float:
        old = self._scores.pop(caption_id, None)  # re-inserted last: the most recently seen
        score = value if old is None else self.decay * old + (1.0 - self.decay) * value
        self._scores[caption_id] = score
        return score

    def scores(self) -> dict[int, float]:
        """Every kept caption's score (steps not flushed yet are not in it)."""
        return dict(self._scores)

    def __len__(self) -> int:
        return len(self._scores)

    def state_dict(self) -> dict[str, Any]:
        """The averages (flush first to include the pending steps)."""
        return {"decay": self.decay, "ids": list(self._scores), "scores": list(self._scores.values())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._scores = collections.OrderedDict(zip((int(i) for i in state["ids"]), (float(s) for s in state["scores"])))
        self._pending.clear()
