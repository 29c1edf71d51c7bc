"""Caption-aware batches: cells of captions that differ from an anchor caption in one word.

With uniformly drawn captions, two captions of a batch rarely share everything but one detail, so
telling them apart never needs that detail (on the procedural grammar: colour x background alone
separates almost every pair of a 16-caption batch, and shape and texture are never needed). A
*cell* is an anchor caption plus captions that equal it word for word except at one word position
(the varying position is drawn per cell among those where the candidates offer alternatives): hard
negatives for whatever that word names. ``vary_words`` narrows the cells to positions where the
anchor's and every neighbour's word are in a given vocabulary (e.g. object nouns), so the batches
teach exactly those distinctions. ``select_cells`` fills a batch with cells; the replay buffer uses
it for a ``hard_fraction`` of its batches (``--hard-negatives``) and draws the others uniformly.

Words are compared after lower-casing, dropping punctuation and the articles a/an/the (so "an
orange" and "a red" differ in one word). Nothing here knows a caption grammar.
"""
from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

ARTICLES = frozenset({"a", "an", "the"})
_WORD = re.compile(r"[a-z0-9']+")


def caption_words(caption: str) -> tuple[str, ...]:
    """Lower-cased words of ``caption`` without punctuation and articles."""
    return tuple(w for w in _WORD.findall(caption.lower()) if w not in ARTICLES)


def select_cells(captions: list[str], count: int, cell_size: int, rng: np.random.Generator,
                 vary_words: frozenset[str] | set[str] | None = None) -> list[list[int]]:
    """Cells of indices into ``captions``, at most ``count`` indices in all, no caption twice.

    Each cell is ``[anchor, *others]``: up to ``cell_size - 1`` other captions equal to the anchor
    except at one word position (drawn per cell among the positions where neighbours exist).
    ``vary_words`` (lower-case words; None or empty = any word): a cell may only vary a position
    where the anchor's word and the neighbours' words are all in this set.
    Anchors are tried in random order; an anchor without any one-word neighbour left is skipped.
    Fewer than ``count`` indices come back when the captions run out of neighbours; the caller
    fills the rest.
    """
    return select_cells_of_words([caption_words(c) for c in captions], count, cell_size, rng, vary_words)


def select_cells_of_words(words: list[tuple[str, ...]], count: int, cell_size: int, rng: np.random.Generator,
                          vary_words: frozenset[str] | set[str] | None = None) -> list[list[int]]:
    """`select_cells` over captions already split by `caption_words` (callers that keep the words)."""
    if cell_size < 2:
        raise ValueError(f"cell_size must be >= 2, got {cell_size}")
    vary = frozenset(vary_words) if vary_words else None
    # (length, position, words with that position blanked) -> indices, one per distinct caption.
    buckets: dict[tuple, list[int]] = defaultdict(list)
    first_of: dict[tuple[str, ...], int] = {}
    for index, w in enumerate(words):
        if w in first_of:
            continue
        first_of[w] = index
        for position in range(len(w)):
            buckets[(len(w), position, w[:position] + w[position + 1:])].append(index)
    used: set[int] = set()
    cells: list[list[int]] = []
    chosen = 0
    for anchor in rng.permutation(list(first_of.values())):
        if chosen >= count:
            break
        anchor = int(anchor)
        if anchor in used:
            continue
        w = words[anchor]
        options = []
        for position in range(len(w)):
            if vary is not None and w[position] not in vary:
                continue
            members = [i for i in buckets[(len(w), position, w[:position] + w[position + 1:])]
                       if i != anchor and i not in used and (vary is None or words[i][position] in vary)]
            if members:
                options.append(members)
        if not options:
            continue
        members = options[int(rng.integers(len(options)))]
        take = min(cell_size - 1, len(members), count - chosen - 1)
        if take < 1:
            break
        cell = [anchor, *(members[int(i)] for i in rng.permutation(len(members))[:take])]
        used.update(cell)
        cells.append(cell)
        chosen += len(cell)
    return cells
