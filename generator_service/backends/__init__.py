"""Backend registry: ``create_backend(config, device)`` builds the backend named by ``config.backend``.

Built-in backends ("procedural", "diffusers") are imported on first use, so importing this package
does not import torch or diffusers. Add a backend with ``@register_backend("name")`` on a `Backend`
subclass whose constructor is ``(config, device)``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable

from generator_service.backends.base import Backend

if TYPE_CHECKING:
    from generator_service.config import GeneratorConfig

BackendFactory = Callable[["GeneratorConfig", str], Backend]


def _lazy(module: str, attribute: str) -> BackendFactory:
    def factory(config: "GeneratorConfig", device: str) -> Backend:
        return getattr(importlib.import_module(module), attribute)(config, device)

    factory.__qualname__ = f"lazy({module}.{attribute})"
    return factory


BACKENDS: dict[str, BackendFactory] = {
    "procedural": _lazy("generator_service.backends.procedural", "ProceduralBackend"),
    "diffusers": _lazy("generator_service.backends.diffusers_backend", "DiffusersBackend"),
}


def register_backend(name: str, factory: BackendFactory | None = None):
    """Register ``factory(config, device) -> Backend`` under ``name``; usable as a class decorator."""

    def register(target: BackendFactory) -> BackendFactory:
        BACKENDS[name] = target
        return target

    return register if factory is None else register(factory)


def create_backend(config: "GeneratorConfig", device: str = "cpu") -> Backend:
    """Build the backend named by ``config.backend`` on ``device`` ("cpu", "cuda", "cuda:1", ...)."""
    try:
        factory = BACKENDS[config.backend]
    except KeyError:
        raise ValueError(
            f"unknown generator backend {config.backend!r}; registered: {', '.join(sorted(BACKENDS))}"
        ) from None
    return factory(config, device)


__all__ = ["BACKENDS", "Backend", "create_backend", "register_backend"]
