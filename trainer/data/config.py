"""Config groups of the data path: ``data`` (where caption groups come from) and ``replay`` (the
online replay buffer). Part of :class:`trainer.config.TrainConfig`; each group checks its own fields.

The groups travel whole: a source builds itself from them (``SOURCES.get(data.source).from_config``,
`trainer.data.sources`), and the replay buffer reads its policy from the ``replay`` group
(`trainer.data.replay.ReplayBuffer`). The allowed ``data.source`` and ``replay.evict`` values are
the names registered in ``SOURCES`` and ``EVICTION_POLICIES``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from trainer.config_checks import choices, choices_from, fail, fraction, positive
from trainer.data.replay_evict import EVICTION_POLICIES
from trainer.data.sources import SOURCES

#: replay.storage: where the buffer lives (`trainer.data.replay_storage.choose_storage_device`)
REPLAY_STORAGE = ("auto", "gpu", "host")


@dataclass
class DataConfig:
    """Where caption groups come from and how many a step takes."""

    source: str = field(default="online", metadata=choices_from(SOURCES.names))
    generators: list[str] = field(default_factory=list)  # online: tcp:// endpoints
    data: list[str] = field(default_factory=list)  # offline: shard directories / files
    folders: list[str] = field(default_factory=list)  # offline official layout: image folders, any names ([] = seed*/)
    captions_per_step: int = 1376  # global caption groups per step, split evenly over processes
    draw_per_caption: int = 6  # n_img images drawn from each group
    image_size: Optional[int] = None  # stored image side (online buffer / offline decode); None = the generator's save size
    connect_timeout: float = 30.0  # seconds to wait for a generator's welcome
    sample_timeout: float = 600.0  # seconds a step may wait for enough groups before failing
    generator_timeout: float = 600.0  # online: no new group from any generator this long -> checkpoint, exit 3
    curve_keys: Optional[str] = None  # online: CurveZMQ key directory (stablerep-generator keys DIR)
    credits: int = 8  # groups in flight per generator endpoint
    # online: every feedback_every steps (0 = off) each generator gets the difficulty of the captions it served
    # that were trained on since the last report (trainer.feedback); feedback_decay: weight of a caption's
    # previous difficulty in its moving average (trainer.objectives.caption_difficulty says why 0.8)
    feedback_every: int = 10
    feedback_decay: float = 0.8
    num_workers: int = 2  # offline: decoding workers
    index_cache: Optional[str] = None  # offline: folder or URL for the scan caches of unindexed tars (default: beside them)
    allow_mixed: bool = False  # offline: accept inputs of different image sizes or images per group
    # offline from an object store: ranged GETs each DataLoader worker keeps in flight, and whether they go
    # straight to the store over signed URLs (infra.signed_ranges) or through the fsspec filesystem's client
    fetch_ahead: int = 32
    direct_gets: bool = True
    dataset_captions: Optional[int] = None  # captions per epoch, to turn epochs into steps (offline: None = count the data)

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first bad field (``data.source`` is checked with the choices)."""
        positive("data.captions_per_step", self.captions_per_step)
        positive("data.draw_per_caption", self.draw_per_caption)
        positive("data.image_size", self.image_size, optional=True)
        positive("data.connect_timeout", self.connect_timeout)
        positive("data.sample_timeout", self.sample_timeout)
        positive("data.generator_timeout", self.generator_timeout)
        positive("data.credits", self.credits)
        if isinstance(self.feedback_every, bool) or self.feedback_every < 0:
            fail("data.feedback_every", self.feedback_every, "must be >= 0 (0: no feedback)")
        if not 0.0 <= self.feedback_decay < 1.0:
            fail("data.feedback_decay", self.feedback_decay, "must be in [0, 1)")
        positive("data.dataset_captions", self.dataset_captions, optional=True)
        if self.num_workers < 0:
            fail("data.num_workers", self.num_workers, "must be >= 0")
        positive("data.fetch_ahead", self.fetch_ahead)
        if self.source == "online" and not self.generators:
            fail("data.generators", self.generators, "the online source needs at least one endpoint (--generators)")
        for endpoint in self.generators:
            if "://" not in endpoint:
                fail("data.generators", endpoint, "an endpoint looks like tcp://HOST:PORT")
        if self.source == "offline" and not self.data:
            fail("data.data", self.data, "the offline source needs at least one shard directory (--data)")


@dataclass
class ReplayConfig:
    """Online replay buffer: capacity, storage and sampling policy."""

    capacity_groups: Optional[int] = None  # exclusive with capacity_gib
    capacity_gib: Optional[float] = None
    storage: str = field(default="auto", metadata=choices(*REPLAY_STORAGE))
    evict: str = field(default="fifo", metadata=choices_from(EVICTION_POLICIES.names))
    max_reuse: Optional[int] = None  # a group is retired after this many draws (None = no limit)
    min_fresh: float = 0.0  # minimum fraction of never-drawn groups per batch, in [0, 1]
    hard_fraction: float = 0.0  # fraction of batches built of caption cells (hard negatives), in [0, 1]
    cell_size: int = 6  # captions per cell: an anchor and captions differing from it in one word
    cell_words: list[str] = field(default_factory=list)  # the words a cell may vary ([] = any word)
    # rate contract (trainer.data.rate_contract): a batch waits while its draws would exceed
    # samples_per_insert x groups inserted + spi_tolerance (None = no contract)
    samples_per_insert: Optional[float] = None
    spi_tolerance: float = 0.0

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first bad field (``storage`` and ``evict`` are checked with the choices)."""
        if self.capacity_groups is not None and self.capacity_gib is not None:
            fail("replay.capacity_gib", self.capacity_gib, "give replay.capacity_groups or replay.capacity_gib, not both")
        positive("replay.capacity_groups", self.capacity_groups, optional=True)
        positive("replay.capacity_gib", self.capacity_gib, optional=True)
        positive("replay.max_reuse", self.max_reuse, optional=True)
        fraction("replay.min_fresh", self.min_fresh)
        fraction("replay.hard_fraction", self.hard_fraction)
        if self.cell_size < 2:
            fail("replay.cell_size", self.cell_size, "a cell holds an anchor and at least one neighbour (>= 2)")
        for word in self.cell_words:
            if not isinstance(word, str) or not word.strip() or len(word.split()) != 1:
                fail("replay.cell_words", word, "every entry must be one word")
        positive("replay.samples_per_insert", self.samples_per_insert, optional=True)
        if isinstance(self.spi_tolerance, bool) or not math.isfinite(self.spi_tolerance) or self.spi_tolerance < 0:
            fail("replay.spi_tolerance", self.spi_tolerance, "must be a finite number >= 0")
