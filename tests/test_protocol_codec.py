"""Round trips and every rejection of the protocol v1 codec."""
from __future__ import annotations

import io

import msgpack
import numpy as np
import pytest
from PIL import Image

from generator_service.config import GeneratorConfig
from protocol import (
    MAX_HEADER_BYTES, Bye, Credit, Error, Group, Heartbeat, Hello, ProtocolError, Welcome, decode, encode,
)


def _group(m=3, h=5, w=7, **kw):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(m, h, w, 3), dtype=np.uint8)
    fields = dict(group_id="fp-000000001", caption_id=1, caption="a red square", seeds=list(range(m)),
                  images=images, generator="abc123", gen_seconds=1.5)
    fields.update(kw)
    return Group(**fields)


@pytest.mark.parametrize(
    "msg",
    [
        Hello(client="trainer", rank=1, world_size=4),
        Welcome(service="svc-1", generator=GeneratorConfig(backend="diffusers").welcome_info(), heartbeat_ms=500),
        Credit(n=7),
        Credit(n=2, ack="g000041"),
        Bye(ack="g000042"),
        Heartbeat(),
        Error(code="bad_message", message="x"),
        Bye(),
        Hello(client="", rank=0, world_size=1),
        Welcome(service="", generator=GeneratorConfig().welcome_info(), heartbeat_ms=1),
    ],
)
def test_control_messages_round_trip(msg):
    frames = encode(msg)
    assert len(frames) == 1
    assert decode(frames) == msg


def test_raw_group_round_trip_is_a_view():
    group = _group()
    frames = encode(group)
    assert len(frames) == 2
    out = decode(frames)
    assert out.header_fields() == group.header_fields()
    np.testing.assert_array_equal(out.images, group.images)
    assert not out.images.flags.writeable
    # zero copy on decode: the array shares the payload frame's memory
    assert np.shares_memory(out.images, np.frombuffer(frames[1], dtype=np.uint8))


def test_raw_group_send_side_shares_array_memory():
    group = _group()
    frames = encode(group)
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.uint8), group.images)


def test_non_contiguous_images_are_encoded_not_rejected():
    base = np.random.default_rng(1).integers(0, 256, size=(2, 10, 12, 3), dtype=np.uint8)
    view = base[:, ::2, 1::2]
    assert not view.flags.c_contiguous
    out = decode(encode(_group(m=2, images=view, seeds=[4, 5])))
    assert out.shape == (2, 5, 6, 3)
    np.testing.assert_array_equal(out.images, view)


def test_encoded_group_round_trip():
    rng = np.random.default_rng(2)
    pngs = []
    for _ in range(2):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    group = Group(group_id="g", caption_id=0, caption="", seeds=[0, 2**64 - 1], encoded=pngs,
                  encoding="png", shape=(2, 6, 4, 3))
    frames = encode(group)
    assert len(frames) == 3
    out = decode(frames)
    assert out.encoded == pngs and out.encoding == "png" and out.images is None


def test_maximal_fields():
    caption = "x" * 20000
    group = _group(m=1, caption=caption, seeds=[2**64 - 1], caption_id=2**62)
    assert decode(encode(group)).caption == caption


def _raw_header(**fields):
    header = {"v": 1, "type": "group", **_group().header_fields()}
    header.update(fields)
    return header


def _frames(header, payload=None):
    packed = msgpack.packb({k: v for k, v in header.items() if v is not _MISSING}, use_bin_type=True)
    return [packed] + ([] if payload is None else payload)


_MISSING = object()
_PAYLOAD = [bytes(3 * 5 * 7 * 3)]


def _code(frames):
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    return info.value


def test_wrong_version():
    err = _code(_frames(_raw_header(v=2), _PAYLOAD))
    assert err.code == "version" and "2" in err.message


@pytest.mark.parametrize("name", ["group_id", "caption_id", "caption", "seeds", "shape", "dtype",
                                  "encoding", "generator", "gen_seconds"])
def test_every_missing_group_field(name):
    err = _code(_frames(_raw_header(**{name: _MISSING}), _PAYLOAD))
    assert err.code == "bad_message" and name in err.message


@pytest.mark.parametrize(
    "name,value",
    [("group_id", 5), ("caption_id", "1"), ("caption_id", True), ("caption", None), ("seeds", "0,1,2"),
     ("shape", {"m": 3}), ("dtype", "float32"), ("encoding", "gif"), ("generator", 3),
     ("gen_seconds", "slow"), ("seeds", [0, 1]), ("seeds", [0, 1, -1]), ("shape", [3, 5, 7, 4]),
     ("shape", [0, 5, 7, 3]), ("shape", [3, 5, 7]), ("caption_id", -1), ("group_id", "")],
)
def test_every_mistyped_group_field(name, value):
    err = _code(_frames(_raw_header(**{name: value}), _PAYLOAD))
    assert err.code == "bad_message" and name in err.message


@pytest.mark.parametrize(
    "header,field",
    [({"type": "hello", "rank": 0, "world_size": 1}, "client"),
     ({"type": "hello", "client": "t", "rank": 2, "world_size": 2}, "rank"),
     ({"type": "hello", "client": "t", "rank": 0, "world_size": 0}, "world_size"),
     ({"type": "welcome", "service": "s", "heartbeat_ms": 10}, "generator"),
     ({"type": "welcome", "service": "s", "generator": {}, "heartbeat_ms": 0}, "heartbeat_ms"),
     ({"type": "credit"}, "n"), ({"type": "credit", "n": 0}, "n"), ({"type": "credit", "n": 1.0}, "n"),
     ({"type": "error", "code": "x"}, "message"), ({"type": "nope"}, "type"), ({"type": 3}, "type"),
     ({}, "type")],
)
def test_control_field_errors(header, field):
    err = _code([msgpack.packb({"v": 1, **header})])
    assert err.code == "bad_message" and field in err.message


def test_missing_version_field():
    err = _code([msgpack.packb({"type": "bye"})])
    assert err.code == "bad_message" and "'v'" in err.message


def test_payload_size_disagrees_with_shape():
    err = _code(_frames(_raw_header(), [bytes(3 * 5 * 7 * 3 - 1)]))
    assert err.code == "bad_message" and "bytes" in err.message


def test_truncated_message_missing_payload():
    err = _code(_frames(_raw_header()))
    assert err.code == "bad_message"


def test_truncated_header_bytes():
    packed = msgpack.packb(_raw_header())
    err = _code([packed[: len(packed) // 2], *_PAYLOAD])
    assert err.code == "bad_message"


def test_payload_on_control_message():
    err = _code([msgpack.packb({"v": 1, "type": "bye"}), b"x"])
    assert err.code == "bad_message"


def test_oversized_message_and_header():
    err = _code([msgpack.packb(_raw_header()), bytes(600)])
    assert err.code == "bad_message"
    with pytest.raises(ProtocolError) as info:
        decode(_frames(_raw_header(), _PAYLOAD), max_bytes=100)
    assert info.value.code == "too_large"
    with pytest.raises(ProtocolError) as info:
        decode([b"\x00" * (MAX_HEADER_BYTES + 1)])
    assert info.value.code == "too_large"
    with pytest.raises(ProtocolError) as info:
        encode(_group(), max_bytes=100)
    assert info.value.code == "too_large"


def test_header_not_a_map_and_empty_frames():
    assert _code([msgpack.packb([1, 2])]).code == "bad_message"
    assert _code([]).code == "bad_message"
    assert _code([b""]).code == "bad_message"


def test_encoded_group_frame_count_and_empty_frame():
    header = _raw_header(encoding="png")
    assert _code(_frames(header, [b"a", b"b"])).code == "bad_message"
    assert _code(_frames(header, [b"a", b"", b"c"])).code == "bad_message"


@pytest.mark.parametrize("ack", [5, "x" * 4097, ["g1"]])
def test_an_ack_that_is_no_group_id_is_refused_naming_the_field(ack):
    for msg_type in ("credit", "bye"):
        header = {"v": 1, "type": msg_type, "ack": ack, **({"n": 1} if msg_type == "credit" else {})}
        error = _code([msgpack.packb(header)])
        assert error.code == "bad_message" and f"{msg_type}.ack" in error.message


@pytest.mark.parametrize("ack", [5, None, "", ["g1"]])
def test_an_ack_on_a_type_without_one_is_an_ignored_unknown_field(ack):
    assert isinstance(decode([msgpack.packb({"v": 1, "type": "heartbeat", "ack": ack})]), Heartbeat)
    hello = {"v": 1, "type": "hello", "client": "t", "rank": 0, "world_size": 1, "ack": ack}
    assert decode([msgpack.packb(hello)]) == Hello(client="t")


def test_encode_refuses_invalid_messages():
    with pytest.raises(ProtocolError):
        encode(Credit(n=0))
    with pytest.raises(ProtocolError):
        encode(Group(group_id="g", caption_id=0, caption="", seeds=[1], encoding="png", encoded=[b"x"]))
    with pytest.raises(ProtocolError):
        _group(images=np.zeros((2, 4, 4), np.uint8))
