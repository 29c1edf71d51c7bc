"""How many caption groups an offline data set holds: the length of an epoch.

The official trainer's epoch is one pass of its DataLoader over the CSV (``len(dataset)`` captions,
``drop_last``), so an offline run given in epochs takes its length from the data, not from a
nominal ``data.dataset_captions``. The count is the offline source's own sample count
(:func:`trainer.data.sources.offline_index.count_groups`): CSV rows for the official layout, the sample
indexes (``shard-N.tar.idx``) of generator shards, and for plain WebDataset tars without one a scan
of their member headers, cached beside them (or in ``index_cache``); local paths and object-store
URLs alike. A shard that a truncation damaged counts the groups it still holds, as an epoch reads.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

from trainer.data.sources.offline_index import count_groups


@lru_cache(maxsize=8)
def _count(paths: tuple[str, ...], folders: tuple[str, ...] | None, index_cache: str | None) -> int:
    return count_groups(list(paths), seed_dirs=list(folders) if folders is not None else None, index_cache=index_cache)


def count_offline_captions(paths: Sequence[str], folders: Sequence[str] | None = None,
                           index_cache: str | None = None) -> int:
    """Caption groups in the offline data ``paths`` (``--data``; ``folders``: the official layout's
    image folders, ``--folders``; ``index_cache``: ``--index-cache``). Raises ``FileNotFoundError`` /
    ``ValueError`` naming a missing or malformed input, as the offline source would."""
    return _count(tuple(str(p) for p in paths), tuple(folders) if folders else None, index_cache)
