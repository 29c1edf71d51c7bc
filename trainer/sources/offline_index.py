"""Global sample index of the offline inputs: every caption group gets one number ``g``.

Built once per process before training (:func:`build_index`): official-layout rows need nothing more
than their count; each tar shard's member headers are scanned once (no image data read) and every
sample (a run of members with one WebDataset key) is stored as the byte range ``[start, end)`` of its
members, two int64 per sample. A DataLoader worker reads sample ``g`` by reading that range and
parsing it as a small tar (:func:`read_sample`), so any permutation of all samples can be read with
one ``pread`` per group: the epoch shuffle is global, at sample level (``trainer.sources.offline``).

Damage is found here, once: shards that cannot be read, truncated shards (their intact samples stay)
and groups a manifest lists but a shard lost are counted in :attr:`SampleIndex.problems`.
"""
from __future__ import annotations

import io
import logging
import os
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from protocol.shards import split_member
from trainer.sources.offline_layout import (
    OfficialTable,
    Part,
    RowsPart,
    describe,
)

log = logging.getLogger("trainer.sources.offline")


@dataclass
class SampleIndex:
    """``offsets[p]`` = global number of the first sample of part ``p`` (``len(parts) + 1`` entries);
    ``ranges[p]`` = int64 ``[count, 2]`` byte ranges of a tar part's samples (None for CSV rows)."""

    offsets: np.ndarray
    ranges: list[np.ndarray | None]
    problems: dict[str, int] = field(default_factory=lambda: {"lost_groups": 0, "damaged_shards": 0,
                                                              "unreadable_shards": 0})

    @property
    def num_samples(self) -> int:
        return int(self.offsets[-1])

    def locate(self, g: int) -> tuple[int, int]:
        """``(part index, sample index inside the part)`` of global sample ``g``."""
        part = int(np.searchsorted(self.offsets, g, side="right")) - 1
        return part, int(g - self.offsets[part])


def _tar_ranges(path: str) -> tuple[np.ndarray, bool]:
    """Byte ranges ``[start, end)`` of the samples of a tar (header scan) and whether it is damaged."""
    members: list[tarfile.TarInfo] = []
    damaged = False
    with open(path, "rb") as handle:
        try:
            with tarfile.open(fileobj=handle, mode="r|") as stream:
                for member in stream:
                    if member.isfile():
                        members.append(member)
        except (tarfile.TarError, EOFError, OSError):
            damaged = True
    size = os.path.getsize(path)
    intact = [m for m in members if m.offset_data + m.size <= size]
    damaged = damaged or len(intact) < len(members)
    ranges: list[list[int]] = []
    last_key = None
    for member in intact:
        parts = split_member(member.name)
        if parts is None:
            continue
        if parts[0] != last_key:
            ranges.append([member.offset, member.offset_data + member.size])
            last_key = parts[0]
        else:
            ranges[-1][1] = member.offset_data + member.size
    if damaged and not ranges:
        raise OSError(f"{path}: not a readable tar file")
    return np.asarray(ranges, dtype=np.int64).reshape(-1, 2), damaged


def build_index(parts: Sequence[Part], tables: Sequence[OfficialTable]) -> SampleIndex:
    """Scan every part once; see the module docstring."""
    counts, ranges = [], []
    problems = {"lost_groups": 0, "damaged_shards": 0, "unreadable_shards": 0}
    for part in parts:
        if isinstance(part, RowsPart):
            counts.append(part.stop - part.start)
            ranges.append(None)
            continue
        try:
            found, damaged = _tar_ranges(part.path)
        except OSError as exc:
            log.warning("skipping unreadable %s: %s", describe(part, tables), exc)
            problems["unreadable_shards"] += 1
            found, damaged = np.zeros((0, 2), dtype=np.int64), False
        if damaged:
            log.warning("%s is damaged (truncated?): reading its %d intact samples", part.path, len(found))
            problems["damaged_shards"] += 1
        if part.expected_groups is not None and len(found) < part.expected_groups:
            problems["lost_groups"] += part.expected_groups - len(found)
        counts.append(len(found))
        ranges.append(found)
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
    return SampleIndex(offsets, ranges, problems)


def read_tar_sample(path: str, start: int, end: int) -> tuple[str, dict[str, Callable[[], bytes]]]:
    """The members of the sample stored at bytes ``[start, end)`` of ``path``: ``(key, {ext: bytes getter})``."""
    with open(path, "rb") as handle:
        handle.seek(start)
        data = handle.read(end - start)
    if len(data) != end - start:
        raise OSError(f"{path}: sample at byte {start} is truncated ({len(data)} of {end - start} bytes)")
    data += bytes(-len(data) % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE)  # block padding + end-of-archive
    files: dict[str, Callable[[], bytes]] = {}
    key = ""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as stream:
        for member in stream:
            parts = split_member(member.name) if member.isfile() else None
            if parts is None:
                continue
            key = parts[0]
            payload = stream.extractfile(member).read()  # type: ignore[union-attr]
            files[parts[1].lower()] = lambda b=payload: b
    return key, files
