"""The generator description: what a generator service's pixels are, as both sides read it.

It travels as the ``generator`` map of ``welcome`` and is stored as the ``generator`` entry of a
shard manifest (``protocol.shards``). The generator builds it from its config
(``GeneratorConfig.welcome_info()``); the trainer reads ``save_size`` (the stored image side, which
sizes the replay buffer) and ``images_per_group`` (m, images stored per caption group) from it.
Fields with no meaning for a backend carry its "not applicable" values (e.g. ``steps = 0``).
"""
from __future__ import annotations

import functools
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .errors import ProtocolError
from .limits import MAX_IMAGE_SIDE, MAX_IMAGES_PER_GROUP, MAX_INFO_EXTRA_FIELDS, MAX_STRING_FIELD

_INFO_SCALARS = (str, int, float, bool)


def _bounds(low: int, high: int | None = None) -> Any:
    """A numeric field of at least ``low`` (and at most ``high``); strings need 1..MAX_STRING_FIELD characters."""
    return field(metadata={"min": low, "max": high})


@dataclass(frozen=True)
class GeneratorInfo:
    """One generator's description (the ``generator`` map of protocol v1).

    Attributes:
        backend: backend name ("diffusers", "procedural", ...).
        model: model identity as given to the backend (path, hub id, "random:sd15", ...).
        scheduler: sampler name ("ddim", "dpm++", ... or "none").
        steps: denoising steps (0 where not applicable).
        guidance: classifier-free guidance scale w.
        height, width: generation size in pixels.
        save_size: side of the stored (served) square images: groups are uint8 ``[m, S, S, 3]``.
        images_per_group: m, images generated and stored per caption group.
        fingerprint: short id of everything that changes pixels; every group carries it.
        extra: further flat, descriptive fields (scalars only), e.g. a recipe name.
    """

    backend: str
    model: str
    scheduler: str
    steps: int = _bounds(0)
    guidance: float = _bounds(0)
    height: int = _bounds(1, MAX_IMAGE_SIDE)
    width: int = _bounds(1, MAX_IMAGE_SIDE)
    save_size: int = _bounds(1, MAX_IMAGE_SIDE)
    images_per_group: int = _bounds(1, MAX_IMAGES_PER_GROUP)
    fingerprint: str
    extra: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_generator_info(self.to_wire())

    @staticmethod
    def check_wire(data: Any, where: str = "welcome.generator") -> None:
        """Raise ``ProtocolError("bad_message")`` naming ``where`` and the field unless ``data`` is a valid map."""
        check_generator_info(data, where)

    def to_wire(self) -> dict[str, Any]:
        """The map sent in ``welcome`` (``extra`` omitted when empty)."""
        out = asdict(self)
        if not out["extra"]:
            out.pop("extra")
        return out

    @classmethod
    def from_wire(cls, data: Any, where: str = "welcome.generator") -> "GeneratorInfo":
        """Check and build from a decoded map; raises ``ProtocolError`` naming the field."""
        check_generator_info(data, where)
        known = {f.name for f in fields(cls)}
        kwargs = {name: data[name] for name in known if name in data}
        kwargs["guidance"] = float(kwargs["guidance"])
        return cls(**kwargs)


@dataclass(frozen=True)
class _FieldRule:
    """What a required field of the description accepts, read from its annotation and metadata."""

    name: str
    kinds: type | tuple[type, ...]  # accepted python types (a bool never counts as a number)
    minimum: int | None  # numbers: lowest value; None for strings (1..MAX_STRING_FIELD characters)
    maximum: int | None


@functools.cache
def _field_rules() -> tuple[_FieldRule, ...]:
    """The rules of ``GeneratorInfo``'s required fields, in declaration order, from their annotations
    and ``_bounds`` metadata."""
    hints = typing.get_type_hints(GeneratorInfo)
    rules = []
    for f in fields(GeneratorInfo):
        if f.default is not MISSING:  # extra: checked on its own (_check_extra)
            continue
        if hints[f.name] is str:
            rules.append(_FieldRule(f.name, str, None, None))
        elif hints[f.name] in (int, float):
            kinds = int if hints[f.name] is int else (int, float)
            rules.append(_FieldRule(f.name, kinds, f.metadata["min"], f.metadata["max"]))
        else:
            raise TypeError(f"GeneratorInfo.{f.name}: no wire rule for {hints[f.name]!r}")
    return tuple(rules)


def _short(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        return f"<{type(value).__name__} of {len(value)}>"
    text = repr(value) if isinstance(value, _INFO_SCALARS) or value is None else f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def check_generator_info(data: Any, where: str = "welcome.generator") -> None:
    """Raise ``ProtocolError("bad_message")`` unless ``data`` is a valid generator map."""
    if not isinstance(data, dict):
        raise ProtocolError("bad_message", f"{where} must be a map, got {type(data).__name__}")
    rules = _field_rules()
    for rule in rules:
        if rule.name not in data:
            raise ProtocolError("bad_message", f"{where} is missing field {rule.name!r}")
        value = data[rule.name]
        if isinstance(value, bool) or not isinstance(value, rule.kinds):
            raise ProtocolError("bad_message", f"{where}.{rule.name} = {_short(value)}: wrong type")
        if rule.minimum is None:
            if not value or len(value) > MAX_STRING_FIELD:
                raise ProtocolError(
                    "bad_message", f"{where}.{rule.name} = {_short(value)}: must be 1..{MAX_STRING_FIELD} characters"
                )
        elif value < rule.minimum:
            raise ProtocolError("bad_message", f"{where}.{rule.name} = {_short(value)}: must be >= {rule.minimum}")
    for rule in rules:
        if rule.maximum is not None and data[rule.name] > rule.maximum:
            raise ProtocolError("bad_message", f"{where}.{rule.name} = {data[rule.name]}: must be <= {rule.maximum}")
    _check_extra(data.get("extra"), where)


def _check_extra(extra: Any, where: str) -> None:
    """``extra``, when present: a map of at most MAX_INFO_EXTRA_FIELDS flat scalars."""
    if extra is None:
        return
    if not isinstance(extra, dict) or len(extra) > MAX_INFO_EXTRA_FIELDS:
        raise ProtocolError("bad_message", f"{where}.extra = {_short(extra)}: must be a map of <= {MAX_INFO_EXTRA_FIELDS} scalars")
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, _INFO_SCALARS):
            raise ProtocolError("bad_message", f"{where}.extra[{_short(key)}] = {_short(value)}: keys are strings, values scalars")
        if isinstance(value, str) and len(value) > MAX_STRING_FIELD:
            raise ProtocolError("bad_message", f"{where}.extra[{_short(key)}]: longer than {MAX_STRING_FIELD} characters")
