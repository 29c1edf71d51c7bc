"""Offline source: caption groups read from disk by DataLoader workers, as :class:`Batch`es.

Layouts (see :mod:`trainer.sources.offline_layout`): generator shards (``DIR/manifest.json`` or
``DIR/shard-{000000..000009}.tar``), plain image-text WebDataset shards, the official StableRep CSV +
``seed*/`` folders.

Epochs: the parts (shards, or CSV row blocks) are permuted with ``(seed, epoch)``; rank ``r`` takes
parts ``r::world_size`` of that order and DataLoader worker ``w`` parts ``w::num_workers`` of the
rank's share; each part's samples are read in an order permuted with ``(seed, epoch, part)``. Every
group is thus read exactly once per epoch by exactly one rank. Epochs repeat forever; a batch at an
epoch boundary is completed from the next epoch (no group is dropped). Use at least
``world_size * num_workers`` shards so no worker idles.

Resume: ``state_dict()`` records the epoch and, per worker, the part and sample to continue from;
``load_state_dict()`` continues the epoch where it stopped (same ``num_workers``; otherwise the
epoch restarts with a warning).

Corrupt data never stops training: an unreadable image or sample, or a shard that cannot be opened,
is logged and skipped. ``stats()["skipped_corrupt"]`` counts skipped groups (including groups a
manifest lists in a shard but a truncated shard lost) plus shards skipped entirely;
``corrupt_shards`` counts damaged shards (intact samples of a truncated shard are still read).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.batch import Batch
from trainer.sources import register_source
from trainer.sources.offline_layout import OfficialTable, Part, resolve_data
from trainer.sources.offline_reader import WorkerItem, iterate_parts

log = logging.getLogger("trainer.sources.offline")

DEFAULT_IMAGE_SIZE = 256  # the paper stores its synthetic images at 256 px


def epoch_part_order(num_parts: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """The order of all parts in ``epoch`` (identical on every rank and worker)."""
    if not shuffle:
        return np.arange(num_parts)
    return np.random.default_rng([seed, epoch]).permutation(num_parts)


def worker_parts(num_parts: int, epoch: int, seed: int, shuffle: bool, rank: int, world_size: int,
                 worker: int, num_workers: int) -> list[int]:
    """Indices of the parts worker ``worker`` of rank ``rank`` reads in ``epoch``."""
    order = epoch_part_order(num_parts, epoch, seed, shuffle)
    return [int(i) for i in order[rank::world_size][worker::num_workers]]


def _identity(item: Any) -> Any:
    return item


class _EpochStream(IterableDataset):
    """One epoch of one rank's groups; each DataLoader worker reads its own parts."""

    def __init__(self, parts: list[Part], tables: list[OfficialTable], *, epoch: int, seed: int, shuffle: bool,
                 rank: int, world_size: int, n: int, image_size: int, starts: dict[int, tuple[int, int]]) -> None:
        self.parts, self.tables = parts, tables
        self.epoch, self.seed, self.shuffle = epoch, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.n, self.image_size, self.starts = n, image_size, starts

    def __iter__(self) -> Iterator[WorkerItem]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        indices = worker_parts(len(self.parts), self.epoch, self.seed, self.shuffle, self.rank, self.world_size,
                               worker, num_workers)
        return iterate_parts(
            self.parts, indices, self.tables, worker=worker, epoch=self.epoch, seed=self.seed, shuffle=self.shuffle,
            n=self.n, image_size=self.image_size, start=self.starts.get(worker, (0, 0)),
        )


@register_source("offline")
class OfflineSource:
    """Batches of ``captions_per_rank`` groups x ``draw_per_caption`` images read from disk.

    Args:
        paths: ``--data`` entries: directories with ``manifest.json``, brace patterns or ``.tar`` files,
            official-layout CSVs (or directories holding one CSV and ``seed*/`` folders).
        captions_per_rank: groups per batch ``G`` (this rank's share).
        draw_per_caption: images per group ``n``.
        image_size: side ``S`` every image is brought to; ``None``: the generator's save size from the
            manifest, else 256.
        rank, world_size: this process's share of the parts.
        num_workers: decoding DataLoader workers (0 = decode in this process).
        seed: seed of the per-epoch shuffles and per-group image choice.
        shuffle: permute parts and samples per epoch.
        pin_memory: allocate batches in pinned memory; ``None``: when CUDA is available.
        seed_dirs: official layout: the seed folders (default ``seed*/`` next to the CSV).
        rows_per_part: official layout: CSV rows per part.
        prefetch_factor: groups each worker decodes ahead.
    """

    def __init__(self, paths: str | Sequence[str], captions_per_rank: int, draw_per_caption: int,
                 image_size: int | None = None, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                 seed: int = 0, shuffle: bool = True, pin_memory: bool | None = None,
                 seed_dirs: Sequence[str] | None = None, rows_per_part: int = 256, prefetch_factor: int = 8) -> None:
        if captions_per_rank < 1 or draw_per_caption < 1:
            raise ValueError(f"captions_per_rank and draw_per_caption must be >= 1, got {captions_per_rank}, "
                             f"{draw_per_caption}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        resolved = resolve_data(paths, seed_dirs=seed_dirs, rows_per_part=rows_per_part)
        if not resolved.parts:
            raise ValueError(f"no shards or rows found in {paths!r}")
        self.parts, self.tables = resolved.parts, resolved.tables
        self.layouts = resolved.layouts
        self.image_size = int(image_size or resolved.image_size or DEFAULT_IMAGE_SIZE)
        self.captions_per_rank, self.draw_per_caption = int(captions_per_rank), int(draw_per_caption)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_workers, self.seed, self.shuffle = int(num_workers), int(seed), bool(shuffle)
        self.prefetch_factor = int(prefetch_factor)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        if self.world_size > len(self.parts):
            log.warning("%d ranks share %d parts: some ranks read nothing", self.world_size, len(self.parts))
        self.epoch = 0
        self._starts: dict[int, tuple[int, int]] = {}  # where each worker resumes in the next epoch stream
        self._positions: dict[int, tuple[int, int]] = {}  # last consumed position per worker, this epoch
        self._epoch_groups = 0
        self._iterator: Iterator[WorkerItem] | None = None
        self._counters = {"batches": 0, "groups": 0, "images": 0, "skipped_corrupt": 0, "corrupt_shards": 0,
                          "groups_short": 0, "epochs_completed": 0, "data_wait_seconds": 0.0}

    # ------------------------------------------------------------------ iteration
    def _start_epoch(self) -> None:
        stream = _EpochStream(
            self.parts, self.tables, epoch=self.epoch, seed=self.seed, shuffle=self.shuffle, rank=self.rank,
            world_size=self.world_size, n=self.draw_per_caption, image_size=self.image_size, starts=self._starts,
        )
        loader = DataLoader(
            stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
        )
        self._positions = dict(self._starts)
        self._starts = {}
        self._iterator = iter(loader)

    def _next_group(self) -> WorkerItem:
        while True:
            if self._iterator is None:
                self._start_epoch()
            try:
                item = next(self._iterator)  # type: ignore[arg-type]
            except StopIteration:
                self._iterator = None
                if self._epoch_groups == 0:
                    raise RuntimeError(
                        f"epoch {self.epoch} of rank {self.rank}/{self.world_size} produced no readable group from "
                        f"{len(self.parts)} parts ({self._counters['skipped_corrupt']} skipped as corrupt)"
                    ) from None
                self.epoch += 1
                self._epoch_groups = 0
                self._positions = {}
                self._counters["epochs_completed"] += 1
                continue
            self._counters["skipped_corrupt"] += item.corrupt_groups + item.unreadable_shards
            self._counters["corrupt_shards"] += item.corrupt_shards
            if item.group is None:
                continue
            self._positions[item.worker] = (item.part_pos, item.next_sample)
            self._epoch_groups += 1
            return item

    def next_batch(self) -> Batch:
        """The next ``G`` groups: images uint8 ``[G, n, S, S, 3]`` (pinned when CUDA is available)."""
        start = time.perf_counter()
        items = [self._next_group() for _ in range(self.captions_per_rank)]
        self._counters["data_wait_seconds"] += time.perf_counter() - start
        G, n, S = self.captions_per_rank, self.draw_per_caption, self.image_size
        images = torch.empty((G, n, S, S, 3), dtype=torch.uint8, pin_memory=self.pin_memory)
        torch.stack([item.group.images for item in items], out=images)  # type: ignore[union-attr]
        caption_ids = torch.tensor([item.group.caption_id for item in items], dtype=torch.int64)  # type: ignore[union-attr]
        captions = [item.group.caption for item in items]  # type: ignore[union-attr]
        short = sum(item.group.short for item in items)  # type: ignore[union-attr]
        c = self._counters
        c["batches"] += 1
        c["groups"] += G
        c["images"] += G * n
        c["groups_short"] += short
        meta = {"epoch": float(self.epoch), "short_fraction": short / G}
        return Batch(images=images, caption_ids=caption_ids, captions=captions, meta=meta)

    # ------------------------------------------------------------------ bookkeeping
    def stats(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "parts": len(self.parts), "image_size": self.image_size, **self._counters}

    def state_dict(self) -> dict[str, Any]:
        """Epoch, per-worker positions and counters: enough to continue the epoch where it stopped."""
        return {
            "epoch": self.epoch,
            "epoch_groups": self._epoch_groups,
            "num_workers": self.num_workers,
            "world_size": self.world_size,
            "num_parts": len(self.parts),
            "positions": {str(w): list(p) for w, p in self._positions.items()},
            "counters": dict(self._counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the next batch starts right after the last group handed out."""
        self.close()
        self.epoch = int(state["epoch"])
        self._counters.update(state.get("counters", {}))
        same_plan = (state.get("num_workers") == self.num_workers and state.get("world_size") == self.world_size
                     and state.get("num_parts") == len(self.parts))
        if same_plan:
            self._starts = {int(w): (int(p[0]), int(p[1])) for w, p in state.get("positions", {}).items()}
            self._epoch_groups = int(state.get("epoch_groups", 0))
        else:
            log.warning("offline source resumed with a different worker/rank/part layout: epoch %d restarts "
                        "from its beginning", self.epoch)
            self._starts, self._epoch_groups = {}, 0

    def close(self) -> None:
        """Stop the decoding workers."""
        self._iterator = None
