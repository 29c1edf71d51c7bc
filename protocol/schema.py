"""Header schemas derived from the message dataclasses: a message class is its own schema.

Every dataclass field of a message is a header field, in declaration order (the order it is sent
in), unless its metadata marks it ``payload`` (a group's images travel as frames). Its annotation
gives its wire kind: ``str``, ``int``, ``float``, ``map`` (``dict``, or a description class with a
``check_wire`` of its own, such as ``GeneratorInfo``) or ``list`` (``list``, ``tuple``); ``X | None``
has the kind of ``X``. What else a field needs travels with it, through ``wire(...)``:

- ``optional``: the header may leave it out, and it is sent only when set (not empty, not 0);
  every other header field is required, default or not;
- ``rule``: its bound, ``rule(value, header) -> str | None``, the rule the value breaks or None;
- ``after``: the fields a rule reads besides its own, whose bounds are checked first.

``Schema.validate`` checks a header in three passes, fields in declaration order: presence and
kind of every field; each field's bound (a field named in ``after`` first); the nested
descriptions, each with its own checks. An optional field that is absent is not checked.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .bounds import short
from .errors import ProtocolError

Rule = Callable[[Any, dict[str, Any]], "str | None"]


def wire(default: Any = dataclasses.MISSING, *, optional: bool = False, payload: bool = False,
         rule: Rule | None = None, after: tuple[str, ...] = ()) -> Any:
    """A message field with its wire metadata (see the module docstring); ``default`` as in ``field``."""
    metadata = {"optional": optional, "payload": payload, "rule": rule, "after": after}
    return dataclasses.field(default=default, metadata=metadata)


def is_int(value: Any) -> bool:
    """An int that is not a bool (MessagePack keeps the two apart; Python does not)."""
    return isinstance(value, int) and not isinstance(value, bool)


#: Wire kind -> whether a decoded value is of it.
KIND_CHECKS: dict[str, Callable[[Any], bool]] = {
    "int": is_int,
    "float": lambda value: isinstance(value, (int, float)) and not isinstance(value, bool),
    "str": lambda value: isinstance(value, str),
    "map": lambda value: isinstance(value, dict),
    "list": lambda value: isinstance(value, (list, tuple)),
}


def wire_kind(annotation: Any) -> str:
    """The wire kind (a key of ``KIND_CHECKS``) of a field's type annotation."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(inner) == 1:
            return wire_kind(inner[0])
    base = typing.get_origin(annotation) or annotation
    if base in (int, float, str):
        return base.__name__
    if base is dict or hasattr(base, "check_wire"):
        return "map"
    if base in (list, tuple):
        return "list"
    raise TypeError(f"no wire kind for the annotation {annotation!r}")


# --- rules (bounds carried by a field) -----------------------------------------------------------


def at_least(low: int) -> Rule:
    return lambda value, header: None if value >= low else f"must be >= {low}"


def within(low: int, high: int, text: str = "") -> Rule:
    """``low <= value <= high``; ``text`` replaces the default wording of the rule."""
    return lambda value, header: None if low <= value <= high else text or f"must be in [{low}, {high}]"


def length_within(low: int, high: int, what: str = "") -> Rule:
    """A string of ``low..high`` characters (``what`` names it in the rule, e.g. "a group_id of ")."""
    return lambda value, header: None if low <= len(value) <= high else f"must be {what}{low}..{high} characters"


def one_of(values: Iterable[Any], text: str = "") -> Rule:
    allowed = tuple(values)
    return lambda value, header: None if value in allowed else text or f"must be one of {list(allowed)}"


# --- schema ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WireField:
    """One header field: its name, wire kind and what its metadata says."""

    name: str
    kind: str
    optional: bool
    rule: Rule | None
    after: tuple[str, ...]
    #: ``check_wire(value, where)`` of a nested description (raises ``ProtocolError``), else None
    nested: Callable[[Any, str], None] | None


@dataclass(frozen=True)
class Schema:
    """The header of one message type, derived from its class (``schema_of``)."""

    msg_type: str
    #: header fields in wire (declaration) order
    fields: tuple[WireField, ...]
    #: the fields with a rule, in the order their bounds are checked
    bounds: tuple[WireField, ...]

    @property
    def required(self) -> dict[str, str]:
        """Required header fields (besides ``v`` and ``type``) -> wire kind."""
        return {f.name: f.kind for f in self.fields if not f.optional}

    @property
    def optional(self) -> dict[str, str]:
        """Fields a header may carry besides the required ones (sent when set) -> wire kind."""
        return {f.name: f.kind for f in self.fields if f.optional}

    def validate(self, header: dict[str, Any]) -> None:
        """Check a decoded header's fields (kinds, then bounds, then nested maps); raise ``ProtocolError``."""
        msg_type = self.msg_type
        for f in self.fields:
            if f.name not in header:
                if f.optional:
                    continue
                raise ProtocolError("bad_message", f"{msg_type} header is missing field {f.name!r}")
            value = header[f.name]
            if not KIND_CHECKS[f.kind](value):
                raise ProtocolError(
                    "bad_message", f"{msg_type}.{f.name} must be {f.kind}, got {type(value).__name__} {short(value)}"
                )
        for f in self.bounds:
            if f.name in header:
                broken = f.rule(header[f.name], header)  # type: ignore[misc]
                if broken is not None:
                    raise ProtocolError("bad_message", f"{msg_type}.{f.name} = {short(header[f.name])}: {broken}")
        for f in self.fields:
            if f.nested is not None and f.name in header:
                f.nested(header[f.name], f"{msg_type}.{f.name}")

    def header_of(self, msg: Any) -> dict[str, Any]:
        """The header fields of ``msg`` (without ``v``/``type``), in wire order; optional ones when set."""
        out: dict[str, Any] = {}
        for f in self.fields:
            value = getattr(msg, f.name)
            if f.optional and not value:
                continue
            if hasattr(value, "to_wire"):
                value = value.to_wire()
            elif isinstance(value, (list, tuple)):
                value = list(value)
            out[f.name] = value
        return out

    def fields_of(self, header: dict[str, Any]) -> dict[str, Any]:
        """The constructor arguments held by a checked header."""
        return {f.name: header[f.name] for f in self.fields if f.name in header}


@functools.cache
def schema_of(cls: type) -> Schema:
    """The schema of message class ``cls`` (its ``TYPE`` and dataclass fields)."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("payload"):
            continue
        annotation = hints[f.name]
        kind = wire_kind(annotation)
        base = typing.get_origin(annotation) or annotation
        nested = getattr(base, "check_wire", None) if kind == "map" else None
        fields.append(WireField(f.name, kind, bool(f.metadata.get("optional")), f.metadata.get("rule"),
                                tuple(f.metadata.get("after", ())), nested))
    return Schema(cls.TYPE, tuple(fields), _bound_order(fields))  # type: ignore[attr-defined]


def _bound_order(fields: list[WireField]) -> tuple[WireField, ...]:
    """The fields with a rule in declaration order, each after the fields its rule reads."""
    by_name = {f.name: f for f in fields}
    order: list[str] = []

    def visit(f: WireField) -> None:
        if f.name not in order:
            for name in f.after:
                visit(by_name[name])
            order.append(f.name)

    for f in fields:
        visit(f)
    return tuple(by_name[name] for name in order if by_name[name].rule is not None)
