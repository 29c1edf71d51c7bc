"""The checks every config group uses: the error type and the range / choice tests behind it.

Each group validates its own fields (``DataConfig.validate``, ``ReplayConfig.validate``, ...);
a failed check raises :class:`ConfigError` naming the field as ``group.field`` and its value.
"""
from __future__ import annotations

import math
import typing
from typing import Any, Callable, Iterable

#: the informational section of a written config.yaml, ignored on load
RESOLVED_KEY = "resolved"

#: (group, old field name) -> the field's name now; old names in YAML files still load, with a warning.
DEPRECATED_FIELDS = {("data", "batch_captions"): "captions_per_step", ("data", "images_per_caption"): "draw_per_caption"}
#: (group, old field name) -> the fields it now sets, each to its value; loads with a warning as above.
SPLIT_FIELDS = {("monitor", "max_images"): ("max_train", "max_val")}


class ConfigError(ValueError):
    """A config value is missing, of the wrong type or out of range; the message names it."""


def choices(*values: str) -> dict:
    """Field metadata: the value must be one of ``values``."""
    return {"choices": values}


def choices_from(names: Callable[[], Iterable[str]]) -> dict:
    """Field metadata: the value must be one of ``names()``, asked when the config is validated
    (a registry's ``names``, so that what registers later is allowed too)."""
    return {"choices": names}


def field_choices(metadata: typing.Mapping) -> tuple[str, ...] | None:
    """The allowed values a field's metadata names (see :func:`choices`, :func:`choices_from`), or None."""
    allowed = metadata.get("choices")
    if allowed is None:
        return None
    return tuple(allowed() if callable(allowed) else allowed)


def fail(name: str, value: Any, why: str) -> typing.NoReturn:
    raise ConfigError(f"config field {name} = {value!r}: {why}")


def positive(name: str, value: Any, optional: bool = False, each: bool = False) -> None:
    """``value`` (or each of its items) is a finite number > 0; None only when ``optional``."""
    if value is None:
        if not optional:
            fail(name, value, "must be set")
        return
    for v in value if each else [value]:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            fail(name, value, "must be a finite number > 0")


def fraction(name: str, value: float) -> None:
    """``value`` is in [0, 1]."""
    if not 0.0 <= value <= 1.0:
        fail(name, value, "must be in [0, 1]")
