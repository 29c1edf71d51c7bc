"""Caption policies: which caption an online service generates next.

An online run hands out positions ``0, 1, 2, ...`` (``generator_service.online_state``); a policy
turns each position into ``(index, epoch)``: the caption at ``index`` of the service's caption set,
and how many groups of that caption were handed out before (its *epoch*, which picks fresh seeds
and a unique group id for it). Policies, by name (``CAPTION_POLICIES``):

- ``uniform``: today's walk, unchanged: position ``p`` is caption ``p % N`` of epoch ``p // N``.
- ``hard``: draws caption ``i`` with probability proportional to ``(floor + s_i / median)^alpha``,
  where ``s_i`` is the trainers' merged score of that caption (``protocol.feedback``; higher: the
  trainer needs more of it), ``median`` the median score of the scored captions (so the policy does
  not depend on the scores' units) and an unscored caption takes the median score. With the
  defaults (floor 1, alpha 1) a caption scored 100x the others weighs 101 / 2 = 50.5 times as much
  as each of them. Floor 0 draws in proportion to ``(s_i / median)^alpha`` alone: a caption scored
  0 (or unscored while the median is 0) is not drawn, and should every weight be 0 (or the sum
  overflow) the policy draws uniformly. The draw at position ``p`` is a function of the base seed, ``p`` and the scores
  at that time, so seeds plus the generator fingerprint still name the pixels.

Both keep the scores they were given, so ``state_dict()`` / ``load_state_dict()`` keep a run's
policy and scores across a restart (``--state``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from infra.registry import Registry

#: Policy name -> factory ``(caption_ids, config, seed) -> CaptionPolicy``.
CAPTION_POLICIES: Registry[Callable[..., "CaptionPolicy"]] = Registry("caption policy")

DEFAULT_HARD_FLOOR = 1.0
DEFAULT_HARD_ALPHA = 1.0


@dataclass(frozen=True)
class CaptionPolicyConfig:
    """A policy by name, with the ``hard`` policy's parameters (``--hard-floor``, ``--hard-alpha``)."""

    name: str = "uniform"
    hard_floor: float = DEFAULT_HARD_FLOOR
    hard_alpha: float = DEFAULT_HARD_ALPHA

    def __post_init__(self) -> None:
        if self.name not in CAPTION_POLICIES:
            raise ValueError(f"unknown caption policy {self.name!r}; choose one of: {', '.join(CAPTION_POLICIES.names())}")
        if not np.isfinite(self.hard_floor) or self.hard_floor < 0:
            raise ValueError(f"--hard-floor must be a finite number >= 0, got {self.hard_floor}")
        if not np.isfinite(self.hard_alpha) or self.hard_alpha <= 0:
            raise ValueError(f"--hard-alpha must be a finite number > 0, got {self.hard_alpha}")


def build_policy(config: CaptionPolicyConfig, caption_ids: Sequence[int], seed: int = 0) -> "CaptionPolicy":
    """The policy ``config`` names over a caption set's ids (in the set's order), seeded ``seed``."""
    return CAPTION_POLICIES.build(config.name, caption_ids, config, seed)


class CaptionPolicy(ABC):
    """What every policy keeps: the caption ids it walks over and the scores it was given.

    Args:
        caption_ids: the caption set's ids, in its order (``CaptionSet.caption_ids``).
        config: the policy's parameters.
        seed: the run's base seed.
    """

    name = ""

    def __init__(self, caption_ids: Sequence[int], config: CaptionPolicyConfig, seed: int = 0) -> None:
        if len(caption_ids) == 0:
            raise ValueError("a caption policy needs at least one caption")
        self.caption_ids = np.asarray(caption_ids, dtype=np.int64)
        # caption id -> index by binary search (a dict of 10M ids would take ~1 GB and ~2 s to build)
        self._id_order = np.argsort(self.caption_ids, kind="stable")
        self._sorted_ids = self.caption_ids[self._id_order]
        self.config = config
        self.seed = int(seed)
        #: merged score per caption (by index); NaN: unscored
        self.scores = np.full(len(self.caption_ids), np.nan)

    def __len__(self) -> int:
        return len(self.caption_ids)

    def index_of(self, caption_id: int) -> int | None:
        """The index of ``caption_id`` in the caption set (its last, if listed twice), or ``None``."""
        k = int(np.searchsorted(self._sorted_ids, caption_id, side="right")) - 1
        if k >= 0 and self._sorted_ids[k] == caption_id:
            return int(self._id_order[k])
        return None

    def update(self, scores: Mapping[int, float]) -> int:
        """Take the merged scores of some captions (caption id -> score); ids not in the set are
        skipped. Returns how many were taken."""
        taken = 0
        for caption_id, score in scores.items():
            index = self.index_of(int(caption_id))
            if index is not None and np.isfinite(score) and score >= 0:
                self.scores[index] = float(score)
                taken += 1
        if taken:
            self._scores_changed()
        return taken

    def scored(self) -> dict[int, float]:
        """Caption id -> score, for the scored captions."""
        return {int(self.caption_ids[i]): float(self.scores[i]) for i in np.flatnonzero(~np.isnan(self.scores))}

    @abstractmethod
    def draw(self, position: int) -> tuple[int, int]:
        """``(index, epoch)`` of the caption handed out at ``position`` (positions come in order)."""

    def state_dict(self, position: int) -> dict[str, Any]:
        """What a restart needs (JSON-ready), taken when ``position`` is the next to be handed out."""
        return {"policy": self.name, "position": int(position), "scores": [[c, s] for c, s in self.scored().items()]}

    def load_state_dict(self, state: Mapping[str, Any], position: int) -> None:
        """Restore a ``state_dict`` before handing out ``position`` (which may be past the state's own
        position: positions leased before a ``kill -9``). Scores are kept whatever the saved policy."""
        self.scores[:] = np.nan
        self.update(dict(_pairs(state, "scores", float)))

    def _scores_changed(self) -> None:  # noqa: B027  (a hook: policies that cache weights override it)
        """Called after new scores were taken; the uniform walk has nothing to recompute."""


@CAPTION_POLICIES.register("uniform")
class UniformPolicy(CaptionPolicy):
    """Every caption in the set's order, epoch after epoch (scores are kept, not used)."""

    name = "uniform"

    def draw(self, position: int) -> tuple[int, int]:
        epoch, index = divmod(int(position), len(self))
        return index, epoch

    def load_state_dict(self, state: Mapping[str, Any], position: int) -> None:
        if state.get("policy", self.name) != self.name:
            raise ValueError(f"this run drew captions with the {state.get('policy')!r} policy: the uniform walk would "
                             f"hand out (caption, epoch) pairs it already served; keep --caption-policy "
                             f"{state.get('policy')}, or use another --state directory")
        super().load_state_dict(state, position)


@CAPTION_POLICIES.register("hard")
class HardPolicy(CaptionPolicy):
    """Captions drawn in proportion to ``(floor + score / median)^alpha`` (module docstring)."""

    name = "hard"

    def __init__(self, caption_ids: Sequence[int], config: CaptionPolicyConfig, seed: int = 0) -> None:
        super().__init__(caption_ids, config, seed)
        #: groups handed out per caption (by index): the epoch of its next one
        self.counts = np.zeros(len(self), dtype=np.int64)
        self._cumulative: np.ndarray | None = None

    def weights(self) -> np.ndarray:
        """Each caption's weight, ``[N]`` float64 (unnormalized)."""
        scored = self.scores[~np.isnan(self.scores)]
        median = float(np.median(scored)) if scored.size else 1.0
        scale = median if median > 0 else (float(scored.mean()) if scored.size and scored.mean() > 0 else 1.0)
        relative = np.where(np.isnan(self.scores), median, self.scores) / scale
        weights = (self.config.hard_floor + relative) ** self.config.hard_alpha
        if not np.isfinite(weights).all() or not weights.sum() > 0:  # floor 0 with every score 0, or an overflow: uniform
            return np.ones(len(self))
        return weights

    def draw(self, position: int) -> tuple[int, int]:
        if self._cumulative is None:
            self._cumulative = np.cumsum(self.weights())
        total = float(self._cumulative[-1])
        target = np.random.default_rng([self.seed, int(position)]).random() * total
        index = min(int(np.searchsorted(self._cumulative, target, side="right")), len(self) - 1)
        epoch = int(self.counts[index])
        self.counts[index] += 1
        return index, epoch

    def follow_uniform(self, position: int) -> None:
        """Epochs as if the ``uniform`` walk had handed out ``0 .. position-1`` (a run that changes
        policy at ``position``): no (caption, epoch) handed out before comes again."""
        laps, rest = divmod(int(position), len(self))
        self.counts[:] = laps
        self.counts[:rest] += 1

    def state_dict(self, position: int) -> dict[str, Any]:
        state = super().state_dict(position)
        drawn = np.flatnonzero(self.counts)
        state["counts"] = [[int(self.caption_ids[i]), int(self.counts[i])] for i in drawn]
        return state

    def load_state_dict(self, state: Mapping[str, Any], position: int) -> None:
        super().load_state_dict(state, position)
        saved_at = state.get("position", 0)
        if isinstance(saved_at, bool) or not isinstance(saved_at, int) or not 0 <= saved_at <= position:
            raise ValueError(f"policy state field 'position' must be an int in [0, {position}], got {str(saved_at)[:40]}")
        if state.get("policy") != self.name:
            self.follow_uniform(position)
            return
        self.counts[:] = 0
        for caption_id, count in _pairs(state, "counts", int):
            index = self.index_of(int(caption_id))
            if index is not None:
                self.counts[index] = int(count)
        # Positions handed out after the save (leased before a kill -9) drew no caption more often than that.
        self.counts += max(0, int(position) - saved_at)

    def _scores_changed(self) -> None:
        self._cumulative = None


def _pairs(state: Mapping[str, Any], key: str, kind: type) -> list[tuple[int, Any]]:
    """``state[key]``, a list of ``[caption_id, value]`` pairs (value an int, or a number >= 0 for
    ``kind`` float), as tuples; ``ValueError`` naming the field otherwise."""
    pairs = state.get(key, [])
    number = (int, float) if kind is float else (int,)

    def good(pair: Any) -> bool:
        return (isinstance(pair, list) and len(pair) == 2 and all(not isinstance(v, bool) for v in pair)
                and isinstance(pair[0], int) and isinstance(pair[1], number) and pair[1] >= 0)

    if not isinstance(pairs, list) or not all(good(pair) for pair in pairs):
        raise ValueError(f"policy state field {key!r} must be a list of [caption_id, {key[:-1]} >= 0] pairs")
    return [(int(c), kind(v)) for c, v in pairs]
