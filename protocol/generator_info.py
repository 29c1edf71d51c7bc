"""The generator description: what a generator service's pixels are, as both sides read it.

It travels as the ``generator`` map of ``welcome`` and is stored as the ``generator`` entry of a
shard manifest (``protocol.shards``). The generator builds it from its config
(``GeneratorConfig.welcome_info()``); the trainer reads ``save_size`` (the stored image side, which
sizes the replay buffer) and ``images_per_group`` (m, images stored per caption group) from it.
Fields with no meaning for a backend carry its "not applicable" values (e.g. ``steps = 0``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import ProtocolError
from .limits import MAX_IMAGE_SIDE, MAX_IMAGES_PER_GROUP, MAX_INFO_EXTRA_FIELDS, MAX_STRING_FIELD

_INFO_SCALARS = (str, int, float, bool)


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
    steps: int
    guidance: float
    height: int
    width: int
    save_size: int
    images_per_group: int
    fingerprint: str
    extra: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_generator_info(self.to_wire())

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


_FIELD_RULES: dict[str, tuple[type | tuple[type, ...], int | None]] = {
    # name: (accepted python types, minimum for numbers / None for strings)
    "backend": (str, None),
    "model": (str, None),
    "scheduler": (str, None),
    "steps": (int, 0),
    "guidance": ((int, float), 0),
    "height": (int, 1),
    "width": (int, 1),
    "save_size": (int, 1),
    "images_per_group": (int, 1),
    "fingerprint": (str, None),
}


def _short(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        return f"<{type(value).__name__} of {len(value)}>"
    text = repr(value) if isinstance(value, _INFO_SCALARS) or value is None else f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def check_generator_info(data: Any, where: str = "welcome.generator") -> None:
    """Raise ``ProtocolError("bad_message")`` unless ``data`` is a valid generator map."""
    if not isinstance(data, dict):
        raise ProtocolError("bad_message", f"{where} must be a map, got {type(data).__name__}")
    for name, (kinds, minimum) in _FIELD_RULES.items():
        if name not in data:
            raise ProtocolError("bad_message", f"{where} is missing field {name!r}")
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ProtocolError("bad_message", f"{where}.{name} = {_short(value)}: wrong type")
        if minimum is None:
            if not value or len(value) > MAX_STRING_FIELD:
                raise ProtocolError("bad_message", f"{where}.{name} = {_short(value)}: must be 1..{MAX_STRING_FIELD} characters")
        elif value < minimum:
            raise ProtocolError("bad_message", f"{where}.{name} = {_short(value)}: must be >= {minimum}")
    if data["images_per_group"] > MAX_IMAGES_PER_GROUP:
        raise ProtocolError(
            "bad_message", f"{where}.images_per_group = {data['images_per_group']}: must be <= {MAX_IMAGES_PER_GROUP}"
        )
    for name in ("height", "width", "save_size"):
        if data[name] > MAX_IMAGE_SIDE:
            raise ProtocolError("bad_message", f"{where}.{name} = {data[name]}: must be <= {MAX_IMAGE_SIDE}")
    extra = data.get("extra")
    if extra is None:
        return
    if not isinstance(extra, dict) or len(extra) > MAX_INFO_EXTRA_FIELDS:
        raise ProtocolError("bad_message", f"{where}.extra = {_short(extra)}: must be a map of <= {MAX_INFO_EXTRA_FIELDS} scalars")
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, _INFO_SCALARS):
            raise ProtocolError("bad_message", f"{where}.extra[{_short(key)}] = {_short(value)}: keys are strings, values scalars")
        if isinstance(value, str) and len(value) > MAX_STRING_FIELD:
            raise ProtocolError("bad_message", f"{where}.extra[{_short(key)}]: longer than {MAX_STRING_FIELD} characters")
