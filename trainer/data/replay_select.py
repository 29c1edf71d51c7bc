"""Which replay-buffer slots make a batch: uniformly over captions, or in caption cells.

Pure functions over the buffer's per-slot arrays (the buffer holds its lock while calling them):
``candidates`` are eligible slot indices in random order, ``caption_ids`` and ``draws`` are the
per-slot ``[C]`` arrays, ``words`` the per-slot `trainer.data.caption_cells.caption_words` of each
caption. Every batch holds ``G`` slots of distinct caption ids, at least ``n_fresh`` of them never
drawn before, or the selector returns None.
"""
from __future__ import annotations

import numpy as np

from trainer.data.caption_cells import select_cells_of_words


def one_per_caption(slots: np.ndarray, caption_ids: np.ndarray) -> np.ndarray:
    """The first slot of each caption id in ``slots``, keeping the order of ``slots``."""
    _, first = np.unique(caption_ids[slots], return_index=True)
    return slots[np.sort(first)]


def select_uniform(candidates: np.ndarray, caption_ids: np.ndarray, draws: np.ndarray, G: int, n_fresh: int,
                   rng: np.random.Generator) -> np.ndarray | None:
    """``G`` slots: fresh groups first (one slot per caption), then the rest over the remaining captions.

    Feasible iff the candidates cover ``>= G`` captions and the never-drawn ones ``>= n_fresh``.
    Returns int64 ``[G]`` in random order, or None.
    """
    fresh = candidates[draws[candidates] == 0]
    take_fresh = one_per_caption(fresh, caption_ids)[:n_fresh]
    if take_fresh.size < n_fresh:
        return None
    others = candidates[~np.isin(caption_ids[candidates], caption_ids[take_fresh])]
    take_other = one_per_caption(others, caption_ids)[: G - n_fresh]
    if take_other.size < G - n_fresh:
        return None
    chosen = np.concatenate([take_fresh, take_other])
    return chosen[rng.permutation(G)]


def select_in_cells(candidates: np.ndarray, caption_ids: np.ndarray, draws: np.ndarray,
                    words: list[tuple[str, ...]], G: int, n_fresh: int, cell_size: int,
                    cell_words: frozenset[str], rng: np.random.Generator) -> np.ndarray | None:
    """``G`` slots of distinct captions, as many as possible in caption cells, the rest uniform.

    Returns int64 ``[G]`` (cells first), or None when fewer than ``G`` captions are candidates or
    the cells leave fewer than ``n_fresh`` never-drawn groups (the caller then draws uniformly).
    """
    pool = one_per_caption(candidates, caption_ids)
    if pool.size < G:
        return None
    cells = select_cells_of_words([words[s] for s in pool], G, cell_size, rng, vary_words=cell_words)
    picked = pool[np.asarray([i for cell in cells for i in cell], dtype=np.int64)]
    rest = pool[~np.isin(pool, picked)][: G - picked.size]
    chosen = np.concatenate([picked, rest]).astype(np.int64)
    if int((draws[chosen] == 0).sum()) < n_fresh:
        return None
    return chosen
