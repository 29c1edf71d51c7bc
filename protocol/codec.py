"""Encode messages to ZeroMQ frames and decode frames back, with every field checked.

Frame 0 is a MessagePack map (the header); a ``group`` adds its image bytes as further frames,
never inside the header. Nothing is pickled. Image frames go out without a copy (the array's own
buffer) and come back as read-only views over the received frame.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import msgpack
import numpy as np

from .bounds import check_structure, clip, short
from .errors import ProtocolError
from .limits import MAX_HEADER_BYTES, MAX_MESSAGE_BYTES, PROTOCOL_VERSION
from .messages import MESSAGE_TYPES, SCHEMAS, Group, Message, validate_header

Frame = bytes | bytearray | memoryview


def _header_of(msg: Message) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "type": msg.TYPE, **SCHEMAS[msg.TYPE].header_of(msg)}


def encode(msg: Message, max_bytes: int = MAX_MESSAGE_BYTES) -> list[Frame]:
    """Turn a message into frames: ``[header, *payload]``.

    Raw images become one frame that shares the array's memory (a C-contiguous copy is made only
    for non-contiguous input). Send the result with ``socket.send_multipart(frames, copy=False)``.
    Raises ``ProtocolError`` if the message would not pass ``decode`` on the other side.
    """
    if type(msg).TYPE not in MESSAGE_TYPES or not isinstance(msg, MESSAGE_TYPES[type(msg).TYPE]):
        raise ProtocolError("bad_message", f"cannot encode {type(msg).__name__}: not a protocol message")
    payload: list[Frame] = []
    if isinstance(msg, Group):
        payload = _group_payload(msg)
    header = _header_of(msg)
    validate_header(header)
    packed = msgpack.packb(header, use_bin_type=True)
    frames: list[Frame] = [packed, *payload]
    _check_sizes(frames, max_bytes)
    if isinstance(msg, Group):
        _check_group_payload(header, frames[1:])
    return frames


def _group_payload(msg: Group) -> list[Frame]:
    if msg.encoding == "raw":
        if msg.images is None:
            raise ProtocolError("bad_message", f"group {msg.group_id!r} has encoding 'raw' but no images")
        images = np.ascontiguousarray(msg.images)
        msg.shape = tuple(int(s) for s in images.shape)  # type: ignore[assignment]
        return [memoryview(images).cast("B")]
    if msg.encoded is None:
        raise ProtocolError("bad_message", f"group {msg.group_id!r} has encoding {msg.encoding!r} but no encoded images")
    if msg.shape is None:
        raise ProtocolError("bad_message", f"group {msg.group_id!r}: encoded images need an explicit shape [m, H, W, 3]")
    return list(msg.encoded)


def _check_sizes(frames: Sequence[Frame], max_bytes: int) -> None:
    header_len = len(frames[0])
    if header_len > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"header frame is {header_len} bytes, limit {MAX_HEADER_BYTES}")
    total = sum(memoryview(f).nbytes for f in frames)
    if total > max_bytes:
        raise ProtocolError("too_large", f"message is {total} bytes, limit {max_bytes}")


def _check_group_payload(header: dict[str, Any], payload: Sequence[Frame]) -> None:
    m, height, width, _ = header["shape"]
    if header["encoding"] == "raw":
        expected = m * height * width * 3
        if len(payload) != 1:
            raise ProtocolError(
                "bad_message", f"group.encoding 'raw' needs exactly 1 payload frame, got {len(payload)}"
            )
        size = memoryview(payload[0]).nbytes
        if size != expected:
            raise ProtocolError(
                "bad_message",
                f"group payload is {size} bytes but shape {header['shape']} needs {expected}",
            )
    else:
        if len(payload) != m:
            raise ProtocolError(
                "bad_message",
                f"group.encoding {header['encoding']!r} needs one frame per image (m = {m}), got {len(payload)}",
            )
        for index, frame in enumerate(payload):
            if memoryview(frame).nbytes == 0:
                raise ProtocolError("bad_message", f"group payload frame {index} (encoded image) is empty")


def _buffer(frame: Any) -> memoryview:
    """A memoryview over a frame: bytes, bytearray, memoryview or a ``zmq.Frame`` (zero copy)."""
    buf = getattr(frame, "buffer", frame)
    try:
        view = memoryview(buf)
    except TypeError as exc:
        raise ProtocolError("bad_message", f"frame of type {type(frame).__name__} is not a bytes-like object") from exc
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def unknown_type_message(msg_type: Any, known: Any = None) -> str:
    """The ``bad_message`` text of a header whose ``type`` is unknown (``known``: the types this
    peer reads; default every type of ``MESSAGE_TYPES``). Peers tell a refused type by it."""
    expected = sorted(MESSAGE_TYPES if known is None else known)
    return f"header.type = {short(msg_type)} is unknown; expected one of {expected}"


def decode_header(frame: Any, max_header_bytes: int = MAX_HEADER_BYTES,
                  larger_headers: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Unpack and check frame 0: a MessagePack map with ``v`` (the int 1) and a known ``type``.

    The unpacked value's depth and size are bounded (``protocol.bounds``) before any field is
    looked at, so every later check and error message works on a small, shallow value.
    ``larger_headers`` (type -> bytes) lets the header of those types be larger than
    ``max_header_bytes``; any other header over it is refused (``too_large``) once unpacked, before
    its values are walked.
    """
    view = _buffer(frame)
    limit = max([max_header_bytes, *(larger_headers or {}).values()])
    if view.nbytes > limit:
        raise ProtocolError("too_large", f"header frame is {view.nbytes} bytes, limit {limit}")
    try:
        header = _unpack(view)
    except ProtocolError:
        if view.nbytes > max_header_bytes:  # not a header of a type allowed more: refused as too large
            raise ProtocolError("too_large", f"header frame is {view.nbytes} bytes, limit {max_header_bytes}") from None
        raise
    if view.nbytes > max_header_bytes:
        msg_type = header.get("type") if isinstance(header, dict) else None
        if not isinstance(msg_type, str) or view.nbytes > (larger_headers or {}).get(msg_type, max_header_bytes):
            raise ProtocolError("too_large", f"header frame is {view.nbytes} bytes, limit {max_header_bytes}")
    return _checked_header(header)


def _unpack(view: memoryview) -> Any:
    """The unpacked header frame, its sizes bounded; ``bad_message`` if it is not MessagePack."""
    try:
        return msgpack.unpackb(
            view,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_HEADER_BYTES,
            max_bin_len=MAX_HEADER_BYTES,
            max_array_len=MAX_HEADER_BYTES,
            max_map_len=4096,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several types (ExtraData, ValueError, TypeError, ...)
        raise ProtocolError(
            "bad_message", f"header is not a valid MessagePack map: {type(exc).__name__}: {clip(str(exc), 120)}"
        ) from None


def _checked_header(header: Any) -> dict[str, Any]:
    """``header`` once its structure, version, type and fields are checked."""
    check_structure(header)
    if not isinstance(header, dict):
        raise ProtocolError("bad_message", f"header must be a MessagePack map, got {type(header).__name__}")
    if "v" not in header:
        raise ProtocolError("bad_message", "header is missing field 'v' (protocol version)")
    version = header["v"]
    if type(version) is not int or version != PROTOCOL_VERSION:  # not 1.0, not True
        raise ProtocolError(
            "version", f"header.v = {short(version)} ({type(version).__name__}), this peer speaks protocol version {PROTOCOL_VERSION} (an int)"
        )
    if "type" not in header:
        raise ProtocolError("bad_message", "header is missing field 'type'")
    msg_type = header["type"]
    if not isinstance(msg_type, str) or msg_type not in MESSAGE_TYPES:
        raise ProtocolError("bad_message", unknown_type_message(msg_type))
    try:
        validate_header(header)
    except ProtocolError as exc:
        exc.msg_type = msg_type
        raise
    return header


def decode(frames: Sequence[Any], max_bytes: int = MAX_MESSAGE_BYTES, max_header_bytes: int = MAX_HEADER_BYTES,
           larger_headers: Mapping[str, int] | None = None) -> Message:
    """Turn received frames (bytes, memoryviews or ``zmq.Frame``s) back into a typed message.

    ``max_header_bytes`` lets a service refuse large headers from trainers (theirs are tiny but for
    ``feedback``, allowed more through ``larger_headers``, as in ``decode_header``), which bounds
    the cost of decoding one message. Raises only ``ProtocolError``. A raw group's ``images`` is a read-only numpy view over the
    payload frame (no copy).
    """
    if not isinstance(frames, (list, tuple)) or len(frames) == 0:
        raise ProtocolError("bad_message", "a message needs at least one frame (the header)")
    views = [_buffer(f) for f in frames]
    header = decode_header(views[0], max_header_bytes, larger_headers)  # bounded by the header limits
    try:
        _check_sizes(views, max_bytes)
        return _message(header, views[1:])
    except ProtocolError as exc:
        exc.msg_type = header["type"]
        raise


def _message(header: dict[str, Any], payload: list[memoryview]) -> Message:
    """The typed message of a checked header and its payload frames."""
    msg_type = header["type"]
    fields = SCHEMAS[msg_type].fields_of(header)
    if msg_type != "group":
        if payload:
            raise ProtocolError("bad_message", f"{msg_type} carries no payload frames, got {len(payload)}")
        return MESSAGE_TYPES[msg_type](**fields)
    _check_group_payload(header, payload)
    if header["encoding"] == "raw":
        images = np.frombuffer(payload[0], dtype=np.uint8).reshape(tuple(header["shape"]))
        if images.flags.writeable:
            images.flags.writeable = False
        return Group(images=images, **fields)
    return Group(encoded=[bytes(p) for p in payload], **fields)
