"""Named factories: the one registry helper behind generator backends, trainer sources and methods.

It sits in ``protocol`` because that is the one package both sides may import; it carries no
generator or trainer code::

    BACKENDS = Registry("generator backend", lazy={"procedural": "generator_service.backends.procedural"})

    @BACKENDS.register("diffusers")
    class DiffusersBackend: ...

    backend = BACKENDS.build("diffusers", config, device)

``lazy`` maps a name to the module that registers it; the module is imported on first use, so a
registry can list names (for ``--help`` and parse-time checks) without importing heavy code.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T", bound=Callable[..., Any])


class Registry(Generic[T]):
    """Factories by name for one kind of part (``kind`` names it in error messages)."""

    def __init__(self, kind: str, lazy: dict[str, str] | None = None) -> None:
        self.kind = kind
        self._factories: dict[str, T] = {}
        self._lazy = dict(lazy or {})

    def register(self, name: str, factory: T | None = None) -> Any:
        """Register ``factory`` under ``name``; without ``factory``, a decorator."""

        def add(target: T) -> T:
            current = self._factories.get(name)
            if current is not None and current is not target:
                raise ValueError(f"{self.kind} {name!r} is already registered by {current!r}")
            self._factories[name] = target
            return target

        return add if factory is None else add(factory)

    def names(self) -> list[str]:
        """Every known name, registered or importable on first use."""
        return sorted(set(self._factories) | set(self._lazy))

    def unregister(self, name: str) -> None:
        """Forget ``name`` (a registered factory, or its lazy module entry)."""
        self._factories.pop(name, None)
        self._lazy.pop(name, None)

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._factories or name in self._lazy

    def get(self, name: str) -> T:
        """The factory of ``name`` (importing its module on first use); ``ValueError`` names the choices."""
        if name not in self._factories and name in self._lazy:
            importlib.import_module(self._lazy[name])
        try:
            return self._factories[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names()) or 'none'}") from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``get(name)(*args, **kwargs)``."""
        return self.get(name)(*args, **kwargs)
