"""Backend registry: ``create_backend(config, device)`` builds the backend named by ``config.backend``.

Built-in backends ("procedural", "diffusers") are imported on first use, so importing this package
does not import torch or diffusers. Add a backend with ``@register_backend("name")`` on a `Backend`
subclass whose constructor is ``(config, device)`` and which declares its `BackendFacts`
(``facts = BackendFacts(...)``); `backend_facts(name)` reads them, and refuses, naming the backend,
one that declares none.

`BACKENDS` is built here and nowhere else: every list of backend names (``--backend``, config
validation) is ``BACKENDS.names()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from generator_service.backends.base import Backend
from generator_service.backends.facts import BackendFacts
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


def _declared_facts(name: str, factory: Any) -> BackendFacts:
    facts = getattr(factory, "facts", None)
    if not isinstance(facts, BackendFacts):
        what = getattr(factory, "__qualname__", repr(factory))
        raise ValueError(
            f"generator backend {name!r} ({what}) declares no BackendFacts: give it "
            "`facts = BackendFacts(model=..., height=..., width=..., save_size=...)` "
            "(generator_service.backends.facts), so its config defaults are its own"
        )
    return facts


def register_backend(name: str, factory: BackendFactory | None = None) -> Any:
    """Register ``factory`` (a `Backend` subclass, or a function with a ``facts`` attribute) under ``name``.

    Without ``factory``, a decorator. A factory without `BackendFacts` is refused here.
    """

    def add(target: BackendFactory) -> BackendFactory:
        _declared_facts(name, target)
        return BACKENDS.register(name, target)

    return add if factory is None else add(factory)


def backend_facts(name: str) -> BackendFacts:
    """The `BackendFacts` of backend ``name`` (importing its module on first use).

    ``ValueError`` for an unknown name (naming the choices) or a backend registered without facts.
    """
    return _declared_facts(name, BACKENDS.get(name))


def create_backend(config: "GeneratorConfig", device: str = "cpu") -> Backend:
    """Build the backend named by ``config.backend`` on ``device`` ("cpu", "cuda", "cuda:1", ...)."""
    return BACKENDS.build(config.backend, config, device)


__all__ = ["BACKENDS", "Backend", "BackendFacts", "backend_facts", "create_backend", "register_backend"]
