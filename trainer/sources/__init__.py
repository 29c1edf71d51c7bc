"""Data sources: swappable producers of :class:`trainer.batch.Batch`, behind a small registry.

A source has ``next_batch() -> Batch``, ``stats() -> dict``, ``state_dict()``, ``load_state_dict()``
and ``close()``. Sources register themselves by name::

    @register_source("offline")
    class OfflineSource: ...

    source = build_source("offline", data="shards/", captions_per_rank=64, draw_per_caption=6)

``build_source`` imports ``trainer.sources.<name>`` on first use, so a module only has to define and
register its class.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

SOURCES: dict[str, Callable[..., Any]] = {}


def register_source(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Class decorator registering a source factory under ``name``."""

    def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
        if name in SOURCES and SOURCES[name] is not factory:
            raise ValueError(f"source {name!r} is already registered by {SOURCES[name]!r}")
        SOURCES[name] = factory
        return factory

    return decorator


def build_source(name: str, **kwargs: Any) -> Any:
    """Instantiate the source registered as ``name`` with ``kwargs``."""
    if name not in SOURCES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; registered sources: {sorted(SOURCES) or 'none'}")
    return SOURCES[name](**kwargs)
