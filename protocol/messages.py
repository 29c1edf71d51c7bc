"""One typed message class per protocol v1 type, with the header schema each must satisfy."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .bounds import short
from .errors import ProtocolError
from .generator_info import GeneratorInfo, check_generator_info
from .limits import ENCODINGS, MAX_CAPTION_ID, MAX_CREDIT, MAX_GROUP_ID_CHARS, MAX_IMAGE_SIDE, MAX_IMAGES_PER_GROUP


@dataclass
class Hello:
    """trainer -> service: first message of a session."""

    TYPE: ClassVar[str] = "hello"
    client: str
    rank: int = 0
    world_size: int = 1


@dataclass
class Welcome:
    """service -> trainer: answer to ``hello``; ``generator`` describes the pixels served."""

    TYPE: ClassVar[str] = "welcome"
    service: str
    generator: GeneratorInfo
    heartbeat_ms: int
    #: most credit (granted but not yet used, plus groups sent and not yet acknowledged by a new
    #: grant) the service lets one client hold; 0 = not announced (an older service).
    max_credit: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.generator, dict):
            self.generator = GeneratorInfo.from_wire(self.generator)
        elif not isinstance(self.generator, GeneratorInfo):
            raise ProtocolError("bad_message", f"welcome.generator must be a GeneratorInfo, got {type(self.generator).__name__}")


@dataclass
class Credit:
    """trainer -> service: the trainer can take ``n`` more groups.

    ``ack`` is the ``group_id`` of the last group the trainer received from this service (empty:
    none yet). It acknowledges that group and every group sent before it in this session; a grant
    without ``ack`` acknowledges nothing, so a client that never reads cannot free its share.
    """

    TYPE: ClassVar[str] = "credit"
    n: int
    ack: str = ""


@dataclass
class Heartbeat:
    """both directions: I am alive."""

    TYPE: ClassVar[str] = "heartbeat"


@dataclass
class Bye:
    """trainer -> service: end of session; the service drops this client's credits.

    ``ack`` as in ``Credit``: groups up to it were received; the service re-queues only the rest.
    """

    TYPE: ClassVar[str] = "bye"
    ack: str = ""


@dataclass
class Error:
    """both directions: the peer's last message was refused (``code`` as in ``ProtocolError``)."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str


@dataclass
class Group:
    """service -> trainer: the m images generated for one caption.

    Exactly one of ``images`` (``encoding == "raw"``: uint8 ``[m, H, W, 3]``, any strides) and
    ``encoded`` (one encoded image per entry) is set. After decoding, raw ``images`` is a read-only
    view over the received frame: copy it into your own storage.
    """

    TYPE: ClassVar[str] = "group"
    group_id: str
    caption_id: int
    caption: str
    seeds: list[int]
    images: np.ndarray | None = None
    encoded: list[bytes] | None = None
    encoding: str = "raw"
    shape: tuple[int, int, int, int] | None = None
    generator: str = ""
    gen_seconds: float = 0.0
    dtype: str = field(default="uint8")

    def __post_init__(self) -> None:
        if self.images is not None:
            if not isinstance(self.images, np.ndarray):
                raise ProtocolError("bad_message", f"group.images must be a numpy array, got {type(self.images).__name__}")
            if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
                raise ProtocolError(
                    "bad_message",
                    f"group.images must be uint8 [m, H, W, 3], got {self.images.dtype} {list(self.images.shape)}",
                )
            if self.shape is None:
                self.shape = tuple(int(s) for s in self.images.shape)  # type: ignore[assignment]
        if self.shape is not None:
            self.shape = tuple(int(s) for s in self.shape)  # type: ignore[assignment]
        self.seeds = [int(s) for s in self.seeds]
        self.caption_id = int(self.caption_id)
        self.gen_seconds = float(self.gen_seconds)

    @property
    def num_images(self) -> int:
        return int(self.shape[0]) if self.shape is not None else 0

    def header_fields(self) -> dict[str, Any]:
        """The ``group`` header fields of protocol v1 (without ``v``/``type``); shards store it as KEY.json."""
        return {
            "group_id": self.group_id,
            "caption_id": self.caption_id,
            "caption": self.caption,
            "seeds": list(self.seeds),
            "shape": list(self.shape) if self.shape is not None else None,
            "dtype": self.dtype,
            "encoding": self.encoding,
            "generator": self.generator,
            "gen_seconds": self.gen_seconds,
        }


MESSAGE_TYPES: dict[str, type] = {
    cls.TYPE: cls for cls in (Hello, Welcome, Credit, Group, Heartbeat, Error, Bye)
}

Message = Hello | Welcome | Credit | Group | Heartbeat | Error | Bye

# --- header schema -------------------------------------------------------------------------------

_INT = "int"
_FLOAT = "float"
_STR = "str"
_MAP = "map"
_LIST = "list"

#: For each type, its required header fields (besides v and type) and their wire types.
SCHEMA: dict[str, dict[str, str]] = {
    "hello": {"client": _STR, "rank": _INT, "world_size": _INT},
    "welcome": {"service": _STR, "generator": _MAP, "heartbeat_ms": _INT},
    "credit": {"n": _INT},
    "group": {
        "group_id": _STR,
        "caption_id": _INT,
        "caption": _STR,
        "seeds": _LIST,
        "shape": _LIST,
        "dtype": _STR,
        "encoding": _STR,
        "generator": _STR,
        "gen_seconds": _FLOAT,
    },
    "heartbeat": {},
    "error": {"code": _STR, "message": _STR},
    "bye": {},
}

#: Fields a header may carry besides the required ones (sent when not at their default).
OPTIONAL: dict[str, dict[str, str]] = {"welcome": {"max_credit": "int"}, "credit": {"ack": "str"}, "bye": {"ack": "str"}}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_TYPE_CHECKS: dict[str, Any] = {
    _INT: _is_int,
    _FLOAT: lambda value: isinstance(value, (int, float)) and not isinstance(value, bool),
    _STR: lambda value: isinstance(value, str),
    _MAP: lambda value: isinstance(value, dict),
    _LIST: lambda value: isinstance(value, (list, tuple)),
}


def _check_type(msg_type: str, name: str, value: Any, kind: str) -> None:
    if not _TYPE_CHECKS[kind](value):
        raise ProtocolError(
            "bad_message", f"{msg_type}.{name} must be {kind}, got {type(value).__name__} {_short(value)}"
        )


_short = short


def _bad(msg_type: str, name: str, value: Any, rule: str) -> ProtocolError:
    return ProtocolError("bad_message", f"{msg_type}.{name} = {_short(value)}: {rule}")


def validate_header(header: dict[str, Any]) -> None:
    """Check a decoded header's fields (types and values) for its ``type``; raise ``ProtocolError``."""
    msg_type = header["type"]
    for name, kind in SCHEMA[msg_type].items():
        if name not in header:
            raise ProtocolError("bad_message", f"{msg_type} header is missing field {name!r}")
        _check_type(msg_type, name, header[name], kind)
    for name, kind in OPTIONAL.get(msg_type, {}).items():
        if name in header:
            _check_type(msg_type, name, header[name], kind)
    if msg_type == "hello":
        if header["world_size"] < 1:
            raise _bad(msg_type, "world_size", header["world_size"], "must be >= 1")
        if not 0 <= header["rank"] < header["world_size"]:
            raise _bad(msg_type, "rank", header["rank"], f"must be in [0, world_size={header['world_size']})")
    elif msg_type == "welcome":
        if header["heartbeat_ms"] < 1:
            raise _bad(msg_type, "heartbeat_ms", header["heartbeat_ms"], "must be >= 1")
        check_generator_info(header["generator"])
        if header.get("max_credit", 0) < 0:
            raise _bad(msg_type, "max_credit", header["max_credit"], "must be >= 0")
    elif msg_type == "credit":
        if not 1 <= header["n"] <= MAX_CREDIT:
            raise _bad(msg_type, "n", header["n"], f"must be in [1, {MAX_CREDIT}]")
    elif msg_type == "group":
        _validate_group(header)
    # Only types that define ``ack`` check it; elsewhere it is an unknown field, ignored like any other.
    if "ack" in OPTIONAL.get(msg_type, {}) and "ack" in header and not 1 <= len(header["ack"]) <= MAX_GROUP_ID_CHARS:
        raise _bad(msg_type, "ack", header["ack"], f"must be a group_id of 1..{MAX_GROUP_ID_CHARS} characters")


def _validate_group(header: dict[str, Any]) -> None:
    shape = header["shape"]
    if len(shape) != 4 or not all(_is_int(s) for s in shape):
        raise _bad("group", "shape", shape, "must be 4 ints [m, H, W, 3]")
    m, height, width, channels = shape
    if channels != 3:
        raise _bad("group", "shape", shape, "last dimension must be 3 (RGB)")
    if not 1 <= m <= MAX_IMAGES_PER_GROUP or not 1 <= height <= MAX_IMAGE_SIDE or not 1 <= width <= MAX_IMAGE_SIDE:
        raise _bad("group", "shape", shape, f"needs 1 <= m <= {MAX_IMAGES_PER_GROUP} and 1 <= H, W <= {MAX_IMAGE_SIDE}")
    seeds = header["seeds"]
    if len(seeds) != m:
        raise _bad("group", "seeds", seeds, f"must hold one seed per image (m = {m}), got {len(seeds)}")
    if not all(_is_int(s) and 0 <= s < 2**64 for s in seeds):
        raise _bad("group", "seeds", seeds, "must be ints in [0, 2**64)")
    if header["dtype"] != "uint8":
        raise _bad("group", "dtype", header["dtype"], "only 'uint8' is defined in protocol v1")
    if header["encoding"] not in ENCODINGS:
        raise _bad("group", "encoding", header["encoding"], f"must be one of {list(ENCODINGS)}")
    if not 0 <= header["caption_id"] <= MAX_CAPTION_ID:
        raise _bad("group", "caption_id", header["caption_id"], "must be in [0, 2**63)")
    if not 1 <= len(header["group_id"]) <= MAX_GROUP_ID_CHARS:
        raise _bad("group", "group_id", header["group_id"], f"must be 1..{MAX_GROUP_ID_CHARS} characters")
