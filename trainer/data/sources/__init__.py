"""Data sources: swappable producers of :class:`trainer.data.batch.Batch`, behind a small registry.

A source has ``next_batch() -> Batch``, ``stats() -> dict``, ``state_dict()``, ``load_state_dict()``
and ``close()``, and builds itself from the config groups with a classmethod
``from_config(data: DataConfig, replay: ReplayConfig, context: SourceContext)``; optionally
``groups_received() -> int``, the distinct caption groups it has had so far on this rank (the k-NN
monitor records it beside each evaluation). Sources register
themselves by name; ``data.source`` (and ``--source``) allows exactly the registered names::

    @register_source("offline")
    class OfflineSource:
        @classmethod
        def from_config(cls, data, replay, context): ...

    source = source_from_config(cfg.data, cfg.replay, SourceContext(captions_per_rank=64))

``lazy`` entries import the source's module on first use (``infra.registry.Registry``), so listing
the names imports no source code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from infra.registry import Registry

if TYPE_CHECKING:
    from trainer.data.config import DataConfig, ReplayConfig

SOURCES: Registry[Any] = Registry(
    "source", lazy={"online": "trainer.data.sources.online", "offline": "trainer.data.sources.offline"},
    group="stablerep.sources",
)
register_source = SOURCES.register


@dataclass(frozen=True)
class SourceContext:
    """What a source needs to know about the process that draws from it, besides its config groups.

    captions_per_rank: caption groups per batch on this process (``G``).
    rank, world_size: this process's place among the trainer processes.
    seed: the run's seed (a source offsets it by rank).
    device: the training device (``torch.device`` or its name).
    training_bytes: returns the training step's estimated peak memory on ``device``, in bytes; asked
        only by a source that places memory beside training (the online replay buffer). None = 0.
    """

    captions_per_rank: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    device: Any = "cpu"
    training_bytes: Optional[Callable[[], int]] = None

    def training_bytes_estimate(self) -> int:
        return int(self.training_bytes()) if self.training_bytes is not None else 0


def source_from_config(data: "DataConfig", replay: "ReplayConfig", context: SourceContext) -> Any:
    """The source registered as ``data.source``, built from the config groups (its ``from_config``)."""
    return SOURCES.get(data.source).from_config(data, replay, context)


def build_source(name: str, *args: Any, **kwargs: Any) -> Any:
    """Instantiate the source registered as ``name`` with its own constructor's arguments."""
    return SOURCES.build(name, *args, **kwargs)
