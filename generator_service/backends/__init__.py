"""Backend registry: ``create_backend(config, device)`` builds the backend named by ``config.backend``.

Built-in backends ("procedural", "diffusers") are imported on first use, so importing this package
does not import torch or diffusers. Add a backend with ``@register_backend("name")`` on a `Backend`
subclass whose constructor is ``(config, device)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from generator_service.backends.base import Backend
from infra.registry import Registry

if TYPE_CHECKING:
    from generator_service.config import GeneratorConfig

BackendFactory = Callable[["GeneratorConfig", str], Backend]

BACKENDS: Registry[BackendFactory] = Registry(
    "generator backend",
    lazy={
        "procedural": "generator_service.backends.procedural",
        "diffusers": "generator_service.backends.diffusers_backend",
    },
    group="stablerep.generator_backends",
)
register_backend = BACKENDS.register


def create_backend(config: "GeneratorConfig", device: str = "cpu") -> Backend:
    """Build the backend named by ``config.backend`` on ``device`` ("cpu", "cuda", "cuda:1", ...)."""
    return BACKENDS.build(config.backend, config, device)


__all__ = ["BACKENDS", "Backend", "create_backend", "register_backend"]
