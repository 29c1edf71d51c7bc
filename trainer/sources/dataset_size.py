"""How many caption groups an offline data set holds: the length of an epoch.

The official trainer's epoch is one pass of its DataLoader over the CSV (``len(dataset)`` captions,
``drop_last``), so an offline run given in epochs takes its length from the data, not from a
nominal ``data.dataset_captions``. Counting stays cheap: generator shards are counted from their
manifest, the official layout from its CSV rows, and only plain WebDataset tars (no manifest) are
scanned, by their tar headers.
"""
from __future__ import annotations

import tarfile
from functools import lru_cache
from typing import Sequence

from protocol.shards import split_member
from trainer.sources.offline_layout import RowsPart, resolve_data


def count_tar_samples(path: str) -> int:
    """Samples (runs of members sharing one WebDataset key) in the tar at ``path``; headers only."""
    count, last_key = 0, None
    with tarfile.open(path, mode="r|") as stream:
        for member in stream:
            parts = split_member(member.name) if member.isfile() else None
            if parts is not None and parts[0] != last_key:
                count, last_key = count + 1, parts[0]
    return count


@lru_cache(maxsize=8)
def _count(paths: tuple[str, ...], folders: tuple[str, ...] | None) -> int:
    resolved = resolve_data(list(paths), seed_dirs=list(folders) if folders is not None else None)
    total = 0
    for part in resolved.parts:
        if isinstance(part, RowsPart):
            total += part.stop - part.start
        elif part.expected_groups is not None:  # listed in a generator manifest
            total += part.expected_groups
        else:
            total += count_tar_samples(part.path)
    return total


def count_offline_captions(paths: Sequence[str], folders: Sequence[str] | None = None) -> int:
    """Caption groups in the offline data ``paths`` (``--data``; ``folders``: the official layout's
    image folders, ``--folders``): manifest counts for generator shards, CSV rows for the official
    layout, samples for plain WebDataset tars. Raises ``FileNotFoundError`` / ``ValueError`` naming a
    missing or malformed input, as the offline source would."""
    return _count(tuple(str(p) for p in paths), tuple(folders) if folders else None)
