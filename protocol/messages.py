"""One typed message class per protocol v1 type; each class is its header schema (``protocol.schema``).

A field's annotation is its wire type and its ``wire(...)`` metadata its bound; ``validate_header``
and the codec read the schema derived from the class, so a field is defined once, here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .errors import ProtocolError
from .generator_info import GeneratorInfo
from .limits import (ENCODINGS, MAX_CAPTION_ID, MAX_CREDIT, MAX_FEEDBACK_ENTRIES, MAX_GROUP_ID_CHARS, MAX_IMAGE_SIDE,
                     MAX_IMAGES_PER_GROUP)
from .schema import Schema, at_least, is_int, length_within, one_of, schema_of, wire, within

#: The rule of an ``ack`` (credit, bye): the id of a group received.
_ACK = length_within(1, MAX_GROUP_ID_CHARS, what="a group_id of ")


def _rank_rule(rank: int, header: dict[str, Any]) -> str | None:
    world_size = header["world_size"]
    return None if 0 <= rank < world_size else f"must be in [0, world_size={world_size})"


def _shape_rule(shape: list[Any], header: dict[str, Any]) -> str | None:
    if len(shape) != 4 or not all(is_int(s) for s in shape):
        return "must be 4 ints [m, H, W, 3]"
    m, height, width, channels = shape
    if channels != 3:
        return "last dimension must be 3 (RGB)"
    if not 1 <= m <= MAX_IMAGES_PER_GROUP or not 1 <= height <= MAX_IMAGE_SIDE or not 1 <= width <= MAX_IMAGE_SIDE:
        return f"needs 1 <= m <= {MAX_IMAGES_PER_GROUP} and 1 <= H, W <= {MAX_IMAGE_SIDE}"
    return None


def _seeds_rule(seeds: list[Any], header: dict[str, Any]) -> str | None:
    m = header["shape"][0]
    if len(seeds) != m:
        return f"must hold one seed per image (m = {m}), got {len(seeds)}"
    if not all(is_int(s) and 0 <= s < 2**64 for s in seeds):
        return "must be ints in [0, 2**64)"
    return None


def _caption_ids_rule(caption_ids: list[Any], header: dict[str, Any]) -> str | None:
    if not 1 <= len(caption_ids) <= MAX_FEEDBACK_ENTRIES:
        return f"must hold 1..{MAX_FEEDBACK_ENTRIES} caption ids, got {len(caption_ids)}"
    if not all(is_int(c) and 0 <= c <= MAX_CAPTION_ID for c in caption_ids):
        return "must be ints in [0, 2**63)"
    return None


def _scores_rule(scores: list[Any], header: dict[str, Any]) -> str | None:
    count = len(header["caption_ids"])
    if len(scores) != count:
        return f"must hold one score per caption id ({count}), got {len(scores)}"
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s >= 0 for s in scores):
        return "must be finite numbers >= 0"
    return None


@dataclass
class Hello:
    """trainer -> service: first message of a session."""

    TYPE: ClassVar[str] = "hello"
    client: str
    rank: int = wire(0, rule=_rank_rule, after=("world_size",))
    world_size: int = wire(1, rule=at_least(1))


@dataclass
class Welcome:
    """service -> trainer: answer to ``hello``; ``generator`` describes the pixels served."""

    TYPE: ClassVar[str] = "welcome"
    service: str
    generator: GeneratorInfo  # checked by GeneratorInfo.check_wire
    heartbeat_ms: int = wire(rule=at_least(1))
    #: most credit (granted but not yet used, plus groups sent and not yet acknowledged by a new
    #: grant) the service lets one client hold; 0 = not announced (an older service).
    max_credit: int = wire(0, optional=True, rule=at_least(0))

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
    n: int = wire(rule=within(1, MAX_CREDIT))
    ack: str = wire("", optional=True, rule=_ACK)


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
    ack: str = wire("", optional=True, rule=_ACK)


@dataclass
class Feedback:
    """trainer -> service: how much the trainer needs more groups of some captions.

    ``scores[i]`` (finite, >= 0; higher: needs more) belongs to ``caption_ids[i]``; at most
    ``MAX_FEEDBACK_ENTRIES`` pairs. Only a welcomed client sends it; a service merges the scores of
    all its clients and may steer which captions it generates next. A service that takes no
    feedback (an older v1 service) answers ``error`` ``bad_message`` naming the type as unknown
    (``protocol.feedback.refuses_feedback``).
    """

    TYPE: ClassVar[str] = "feedback"
    caption_ids: list[int] = wire(rule=_caption_ids_rule)
    scores: list[float] = wire(rule=_scores_rule, after=("caption_ids",))

    def __post_init__(self) -> None:
        self.caption_ids = list(self.caption_ids)
        self.scores = list(self.scores)


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
    group_id: str = wire(rule=length_within(1, MAX_GROUP_ID_CHARS))
    caption_id: int = wire(rule=within(0, MAX_CAPTION_ID, "must be in [0, 2**63)"))
    caption: str
    seeds: list[int] = wire(rule=_seeds_rule, after=("shape",))
    shape: tuple[int, int, int, int] | None = wire(None, rule=_shape_rule)
    dtype: str = wire("uint8", rule=one_of(["uint8"], "only 'uint8' is defined in protocol v1"))
    encoding: str = wire("raw", rule=one_of(ENCODINGS))
    generator: str = ""
    gen_seconds: float = 0.0
    images: np.ndarray | None = wire(None, payload=True)
    encoded: list[bytes] | None = wire(None, payload=True)

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
        return schema_of(Group).header_of(self)


MESSAGE_TYPES: dict[str, type] = {
    cls.TYPE: cls for cls in (Hello, Welcome, Credit, Group, Heartbeat, Error, Bye, Feedback)
}

Message = Hello | Welcome | Credit | Group | Heartbeat | Error | Bye | Feedback

#: Each type's header schema, derived from its class.
SCHEMAS: dict[str, Schema] = {msg_type: schema_of(cls) for msg_type, cls in MESSAGE_TYPES.items()}


def validate_header(header: dict[str, Any]) -> None:
    """Check a decoded header's fields (types and values) for its ``type``; raise ``ProtocolError``."""
    SCHEMAS[header["type"]].validate(header)

