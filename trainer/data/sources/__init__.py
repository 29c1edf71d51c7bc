"""Data sources: swappable producers of :class:`trainer.data.batch.Batch`, behind a small registry.

A source has ``next_batch() -> Batch``, ``stats() -> dict``, ``state_dict()``, ``load_state_dict()``
and ``close()``. Sources register themselves by name::

    @register_source("offline")
    class OfflineSource: ...

    source = build_source("offline", data="shards/", captions_per_rank=64, draw_per_caption=6)

``build_source`` imports the source's module on first use (``infra.registry.Registry``).
"""
from __future__ import annotations

from typing import Any, Callable

from infra.registry import Registry

SOURCES: Registry[Callable[..., Any]] = Registry(
    "source", lazy={"online": "trainer.data.sources.online", "offline": "trainer.data.sources.offline"},
    group="stablerep.sources",
)
register_source = SOURCES.register


def build_source(name: str, **kwargs: Any) -> Any:
    """Instantiate the source registered as ``name`` with ``kwargs``."""
    return SOURCES.build(name, **kwargs)
