"""Named factories: the one registry helper behind generator backends, trainer sources and methods.

It sits in ``infra`` (shared helpers that are not part of the wire format) and carries no generator
or trainer code::

    BACKENDS = Registry("generator backend", lazy={"procedural": "generator_service.backends.procedural"},
                        group="stablerep.generator_backends")

    @BACKENDS.register("diffusers")
    class DiffusersBackend: ...

    backend = BACKENDS.build("diffusers", config, device)

``lazy`` maps a name to the module that registers it; the module is imported on first use, so a
registry can list names (for ``--help`` and parse-time checks) without importing heavy code.

``group`` names an entry-point group (``importlib.metadata``) through which installed packages add
parts without touching this code. A plugin's ``pyproject.toml`` declares, for example::

    [project.entry-points."stablerep.methods"]
    toy = "my_plugin.methods:ToyMethod"

The group is read on the first lookup or listing; an entry point's module is imported only when
its name is used, and the object it names is registered under the entry point's name. A plugin
that fails to import raises :class:`PluginError` naming the entry point and its package; listing
names (``--help``) never imports a plugin. In-tree names win over an entry point of the same name
(which is skipped with a warning).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T", bound=Callable[..., Any])


class PluginError(ImportError):
    """An entry-point plugin could not be loaded; the message names the entry point and its package."""


def _package_of(entry: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "an unknown package"


class Registry(Generic[T]):
    """Factories by name for one kind of part (``kind`` names it in error messages)."""

    def __init__(self, kind: str, lazy: dict[str, str] | None = None, group: str | None = None) -> None:
        self.kind = kind
        self.group = group
        self._factories: dict[str, T] = {}
        self._lazy = dict(lazy or {})
        self._entry_points: dict[str, importlib.metadata.EntryPoint] | None = None if group else {}

    def register(self, name: str, factory: T | None = None) -> Any:
        """Register ``factory`` under ``name``; without ``factory``, a decorator."""

        def add(target: T) -> T:
            current = self._factories.get(name)
            if current is not None and current is not target:
                raise ValueError(f"{self.kind} {name!r} is already registered by {current!r}")
            self._factories[name] = target
            return target

        return add if factory is None else add(factory)

    def _plugins(self) -> dict[str, importlib.metadata.EntryPoint]:
        """Entry points of ``group`` by name (read once); names taken in-tree are skipped."""
        if self._entry_points is None:
            found: dict[str, importlib.metadata.EntryPoint] = {}
            for entry in importlib.metadata.entry_points(group=self.group):
                taken = entry.name in self._factories or entry.name in self._lazy
                if taken or entry.name in found:
                    other = "a built-in" if taken else f"{found[entry.name].value} ({_package_of(found[entry.name])})"
                    warnings.warn(f"{self.kind} {entry.name!r} from entry point {entry.value!r} of "
                                  f"{_package_of(entry)} (group {self.group}) is ignored: the name is taken by {other}",
                                  stacklevel=3)
                    continue
                found[entry.name] = entry
            self._entry_points = found
        return self._entry_points

    def names(self) -> list[str]:
        """Every known name: registered, importable on first use, or declared by an installed plugin."""
        return sorted(set(self._factories) | set(self._lazy) | set(self._plugins()))

    def unregister(self, name: str) -> None:
        """Forget ``name`` (a registered factory, its lazy module entry, or its entry point)."""
        self._factories.pop(name, None)
        self._lazy.pop(name, None)
        self._plugins().pop(name, None)

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._factories or name in self._lazy or name in self._plugins()

    def _load_plugin(self, name: str) -> None:
        entry = self._plugins()[name]
        try:
            factory = entry.load()
        except Exception as exc:  # any failure inside a third-party module
            raise PluginError(
                f"{self.kind} {name!r}: entry point {entry.name} = {entry.value!r} (group {self.group}) of "
                f"{_package_of(entry)} failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        if name not in self._factories:  # the module may have registered it itself
            self.register(name, factory)

    def get(self, name: str) -> T:
        """The factory of ``name`` (importing its module on first use); ``ValueError`` names the choices."""
        if name not in self._factories:
            if name in self._lazy:
                importlib.import_module(self._lazy[name])
            elif name in self._plugins():
                self._load_plugin(name)
        try:
            return self._factories[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names()) or 'none'}") from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``get(name)(*args, **kwargs)``."""
        return self.get(name)(*args, **kwargs)
