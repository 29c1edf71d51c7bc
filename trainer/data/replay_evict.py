"""Eviction policies of the replay buffer: which group leaves a full buffer first.

A policy is a function ``(order int64 [K], draws int64 [K]) -> int``: given the insertion sequence
numbers and the draw counts of the ``K`` groups that may leave (held, not being gathered), it
returns the index (into those ``K``) of the one to evict. Groups spent by ``max_reuse`` leave
before any policy is asked (`trainer.data.replay.ReplayBuffer`). Policies register by name; the
config (``replay.evict``) and the command line (``--replay-evict``) offer exactly the registered
names::

    @EVICTION_POLICIES.register("least-used")
    def evict_least_used(order, draws): return int(np.lexsort((order, draws))[0])

This module imports numpy only: the config reads its names without importing torch.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from infra.registry import Registry

EvictionPolicy = Callable[[np.ndarray, np.ndarray], int]

EVICTION_POLICIES: Registry[EvictionPolicy] = Registry("eviction policy")


@EVICTION_POLICIES.register("fifo")
def evict_oldest(order: np.ndarray, draws: np.ndarray) -> int:
    """The oldest group leaves first."""
    return int(np.argmin(order))


@EVICTION_POLICIES.register("most-used")
def evict_most_used(order: np.ndarray, draws: np.ndarray) -> int:
    """The group drawn most often leaves first; ties: the oldest (lexsort: the last key is primary)."""
    return int(np.lexsort((order, -draws))[0])
