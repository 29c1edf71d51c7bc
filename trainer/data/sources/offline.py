"""Offline source: caption groups read from disk by DataLoader workers, as :class:`Batch`es.

Layouts (see :mod:`trainer.data.sources.offline_layout`): generator shards (``DIR/manifest.json`` or
``DIR/shard-{000000..000009}.tar``), plain image-text WebDataset shards, the official StableRep CSV +
``seed*/`` folders.

Epochs: every group has a global number (:mod:`trainer.data.sources.offline_index`); each epoch permutes
all of them with ``(seed, epoch)`` (a global, sample-level shuffle, as the official
DistributedSampler). The epochs form one stream of positions, split over ranks and DataLoader workers
by :mod:`trainer.data.sources.offline_stream`: every rank gets the same number of groups per step, a batch
mixes groups from the whole data set, and a batch at an epoch boundary is completed from the next
epoch (no group is dropped, none repeated within an epoch).

Resume: ``state_dict()`` records the stream basis, the seed, the data set's size and fingerprint and
how many positions this rank read; ``load_state_dict()`` takes the states of every rank of the saved
run and resumes on any world size and number of workers, reading every sample of the interrupted
epoch exactly once. A state of another data set (fingerprint, sample count) or seed is refused.

Corrupt data never stops training: an unreadable image or sample, or a shard that cannot be opened,
is logged and skipped. ``stats()["skipped_corrupt"]`` counts skipped groups (including groups a
manifest lists in a shard but a truncated shard lost) plus shards skipped entirely;
``corrupt_shards`` counts damaged or unreadable shards (intact samples of a truncated shard are still
read). Shard damage is found when the index is built, so it counts once per process at start.
A group with fewer images than ``draw_per_caption`` is skipped and counted in ``skipped_short`` (it
would make a positive pair of an image with itself); a manifest that says so refuses the run at start.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.data.batch import Batch
from trainer.data.config import DataConfig, ReplayConfig
from trainer.data.sources import SourceContext, register_source
from trainer.data.sources.offline_index import SampleIndex, build_index, data_fingerprint
from trainer.data.sources.offline_layout import OfficialTable, Part, check_uniform, resolve_data
from trainer.data.sources.offline_reader import WorkerItem, iterate_samples
from trainer.data.sources.offline_stream import StreamBasis, epoch_order, merge_progress

log = logging.getLogger("trainer.data.sources.offline")

DEFAULT_IMAGE_SIZE = 256  # the paper stores its synthetic images at 256 px


def _identity(item: Any) -> Any:
    return item


class _EpochStream(IterableDataset):
    """One epoch of one rank's stream positions; DataLoader worker ``w`` reads every ``K``-th one."""

    def __init__(self, parts: list[Part], tables: list[OfficialTable], index: SampleIndex, *, positions: np.ndarray,
                 epoch: int, seed: int, shuffle: bool, n: int, image_size: int, fetch_ahead: int | None = None,
                 direct_gets: bool = True) -> None:
        self.parts, self.tables, self.index, self.positions = parts, tables, index, positions
        self.epoch, self.seed, self.shuffle = epoch, seed, shuffle
        self.n, self.image_size = n, image_size
        self.fetch_ahead, self.direct_gets = fetch_ahead, direct_gets

    def __iter__(self) -> Iterator[WorkerItem]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        N = self.index.num_samples
        order = epoch_order(N, self.epoch, self.seed, self.shuffle)
        samples = order[self.positions[worker::num_workers] - self.epoch * N]
        return iterate_samples(samples, self.index, self.parts, self.tables, worker=worker, epoch=self.epoch,
                               seed=self.seed, n=self.n, image_size=self.image_size, fetch_ahead=self.fetch_ahead,
                               direct_gets=self.direct_gets)


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
        rows_per_part: official layout: CSV rows per part (bookkeeping only; the shuffle is per sample).
        prefetch_factor: groups each worker decodes ahead.
        index_cache: where scans of tars without a shard index are cached (``None``: beside them).
        allow_mixed: accept inputs of different image sizes or images per group.
        fetch_ahead: object stores: ranged GETs each worker keeps in flight (``None``: ``FETCH_AHEAD``).
        direct_gets: object stores: GETs straight to the store over signed URLs (:mod:`infra.signed_ranges`),
            else through the fsspec filesystem's client.
    """

    def __init__(self, paths: str | Sequence[str], captions_per_rank: int, draw_per_caption: int,
                 image_size: int | None = None, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                 seed: int = 0, shuffle: bool = True, pin_memory: bool | None = None,
                 seed_dirs: Sequence[str] | None = None, rows_per_part: int = 256, prefetch_factor: int = 8,
                 index_cache: str | None = None, allow_mixed: bool = False, fetch_ahead: int | None = None,
                 direct_gets: bool = True) -> None:
        if captions_per_rank < 1 or draw_per_caption < 1:
            raise ValueError(f"captions_per_rank and draw_per_caption must be >= 1, got {captions_per_rank}, "
                             f"{draw_per_caption}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        resolved = resolve_data(paths, seed_dirs=seed_dirs, rows_per_part=rows_per_part)
        if not resolved.parts:
            raise ValueError(f"no shards or rows found in {paths!r}")
        check_uniform(resolved.inputs, draw_per_caption, allow_mixed)
        self.parts, self.tables = resolved.parts, resolved.tables
        self.layouts = resolved.layouts
        self.image_size = int(image_size or resolved.image_size or DEFAULT_IMAGE_SIZE)
        self.captions_per_rank, self.draw_per_caption = int(captions_per_rank), int(draw_per_caption)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_workers, self.seed, self.shuffle = int(num_workers), int(seed), bool(shuffle)
        self.prefetch_factor = int(prefetch_factor)
        self.fetch_ahead, self.direct_gets = (None if fetch_ahead is None else int(fetch_ahead)), bool(direct_gets)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.index = build_index(self.parts, self.tables, index_cache)
        if self.index.num_samples == 0:
            raise ValueError(f"no readable caption group in {paths!r}")
        self.fingerprint = data_fingerprint(self.parts, self.tables, self.index.num_samples)
        self.basis = StreamBasis(0, world_size=self.world_size)
        self.epoch = 0
        self._consumed = 0  # stream positions this rank has taken under ``basis`` (groups and skipped ones)
        self._epoch_items = 0
        self._epoch_groups = 0
        self.batch_epochs: list[int] = []
        self._iterator: Iterator[WorkerItem] | None = None
        # ``groups`` counts draws (an epoch repeats them); ``distinct_groups`` the groups of the first epoch
        self._counters = {"batches": 0, "groups": 0, "images": 0, "skipped_corrupt": 0, "corrupt_shards": 0,
                          "skipped_short": 0, "epochs_completed": 0, "data_wait_seconds": 0.0, "distinct_groups": 0}
        problems = self.index.problems
        self._counters["skipped_corrupt"] = problems["lost_groups"] + problems["unreadable_shards"]
        self._counters["corrupt_shards"] = problems["damaged_shards"] + problems["unreadable_shards"]

    @classmethod
    def from_config(cls, data: DataConfig, replay: ReplayConfig, context: SourceContext) -> "OfflineSource":
        """The source a training process draws from (``data.source = "offline"``); ``replay`` is not read."""
        return cls(data.data, captions_per_rank=context.captions_per_rank, draw_per_caption=data.draw_per_caption,
                   image_size=data.image_size, rank=context.rank, world_size=context.world_size,
                   num_workers=data.num_workers, seed=context.seed, seed_dirs=list(data.folders) or None,
                   index_cache=data.index_cache, allow_mixed=data.allow_mixed, fetch_ahead=data.fetch_ahead,
                   direct_gets=data.direct_gets)

    # ------------------------------------------------------------------ iteration
    def _start_epoch(self) -> None:
        positions = self.basis.rank_positions(self.epoch, self.index.num_samples, self.rank)
        stream = _EpochStream(
            self.parts, self.tables, self.index, positions=positions, epoch=self.epoch, seed=self.seed,
            shuffle=self.shuffle, n=self.draw_per_caption, image_size=self.image_size, fetch_ahead=self.fetch_ahead,
            direct_gets=self.direct_gets,
        )
        workers = min(self.num_workers, len(positions))
        loader = DataLoader(
            stream, batch_size=None, num_workers=workers, collate_fn=_identity,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
        )
        self._epoch_items = self._epoch_groups = 0
        self._iterator = iter(loader)

    def _next_group(self) -> WorkerItem:
        empty_epochs = 0
        while True:
            if self._iterator is None:
                self._start_epoch()
            try:
                item = next(self._iterator)  # type: ignore[arg-type]
            except StopIteration:
                self._iterator = None
                if self._epoch_items and not self._epoch_groups:
                    c = self._counters
                    raise RuntimeError(
                        f"epoch {self.epoch} of rank {self.rank}/{self.world_size} produced no readable group from "
                        f"{self.index.num_samples} groups ({c['skipped_corrupt']} skipped as corrupt, "
                        f"{c['skipped_short']} with fewer images than draw_per_caption = {self.draw_per_caption})"
                    ) from None
                empty_epochs = empty_epochs + 1 if not self._epoch_items else 0
                if empty_epochs > self.world_size + 1:
                    raise RuntimeError(f"rank {self.rank}/{self.world_size}: no group to read in {empty_epochs} epochs") from None
                self.epoch += 1
                self._counters["epochs_completed"] += 1
                continue
            self._consumed += 1
            self._epoch_items += 1
            if item.group is None:
                self._counters["skipped_short" if item.short else "skipped_corrupt"] += 1
                continue
            self._epoch_groups += 1
            if self.epoch == 0:  # each position of an epoch is a different group of the data set
                self._counters["distinct_groups"] += 1
            return item

    def next_batch(self) -> Batch:
        """The next ``G`` groups: images uint8 ``[G, n, S, S, 3]`` (pinned when CUDA is available)."""
        start = time.perf_counter()
        items, epochs = [], []
        for _ in range(self.captions_per_rank):
            items.append(self._next_group())
            epochs.append(self.epoch)
        self.batch_epochs = epochs  # epoch of each group of this batch (a batch may span two)
        self._counters["data_wait_seconds"] += time.perf_counter() - start
        G, n, S = self.captions_per_rank, self.draw_per_caption, self.image_size
        images = torch.empty((G, n, S, S, 3), dtype=torch.uint8, pin_memory=self.pin_memory)
        torch.stack([item.group.images for item in items], out=images)  # type: ignore[union-attr]
        caption_ids = torch.tensor([item.group.caption_id for item in items], dtype=torch.int64)  # type: ignore[union-attr]
        captions = [item.group.caption for item in items]  # type: ignore[union-attr]
        c = self._counters
        c["batches"] += 1
        c["groups"] += G
        c["images"] += G * n
        meta = {"epoch": float(self.epoch)}
        return Batch(images=images, caption_ids=caption_ids, captions=captions, meta=meta)

    # ------------------------------------------------------------------ bookkeeping
    def stats(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "parts": len(self.parts), "samples": self.index.num_samples,
                "index_bytes": self.index.nbytes, "image_size": self.image_size, **self._counters}

    def groups_received(self) -> int:
        """Distinct caption groups this rank has handed to training so far: those of its first epoch
        (later epochs read the same groups again), corrupt and short ones skipped. The k-NN monitor's
        ``groups_received`` (trainer/monitor.py)."""
        return int(self._counters["distinct_groups"])

    def state_dict(self) -> dict[str, Any]:
        """This rank's progress in the layout-independent stream (see the module docstring)."""
        return {
            "layout_independent": True,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples": self.index.num_samples,
            "data_fingerprint": self.fingerprint,
            "basis": self.basis.to_dict(),
            "rank": self.rank,
            "consumed": self._consumed,
            "counters": dict(self._counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after what every rank of the saved run read.

        ``state``: ``{"ranks": [state of rank 0, 1, ...]}`` (what ``trainer.checkpoint`` loads for a
        layout-independent source), or a single rank's ``state_dict()`` of a one-rank run.

        Raises:
            ValueError: the state is of another data set, seed or shuffle, or incomplete (names the field).
        """
        self.close()
        ranks = state.get("ranks") if "ranks" in state else [state]
        if not ranks or not all(isinstance(r, dict) and r.get("layout_independent") for r in ranks):
            raise ValueError("offline resume state: written by an older layout-dependent version; "
                             "resume with that version or start a new run")
        ranks = sorted(ranks, key=lambda r: int(r["rank"]))
        mine = {"num_samples": self.index.num_samples, "data_fingerprint": self.fingerprint, "seed": self.seed,
                "shuffle": self.shuffle}
        for saved in ranks:
            for field_name, value in mine.items():
                if saved.get(field_name) != value:
                    raise ValueError(f"offline resume state: field {field_name} = {saved.get(field_name)!r} in the "
                                     f"checkpoint, {value!r} for this run's data (another data set or seed?)")
        basis = StreamBasis.from_dict(ranks[0]["basis"])
        if [int(r["rank"]) for r in ranks] != list(range(basis.world_size)):
            raise ValueError(f"offline resume state: ranks {[r['rank'] for r in ranks]} saved, the run had "
                             f"{basis.world_size}")
        self.basis = merge_progress(basis, [int(r["consumed"]) for r in ranks], self.world_size)
        self._consumed = 0
        self.epoch = self.basis.first_epoch(self.index.num_samples)
        counters = ranks[min(self.rank, len(ranks) - 1)].get("counters", {})
        self._counters.update({k: v for k, v in counters.items() if k in self._counters})

    def close(self) -> None:
        """Stop the decoding workers."""
        self._iterator = None
