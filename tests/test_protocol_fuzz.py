"""Property-based fuzzing: decoding arbitrary frames raises only ProtocolError, never anything else."""
from __future__ import annotations

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import ProtocolError, decode

_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=True) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
_keys = st.sampled_from(["v", "type", "group_id", "caption_id", "caption", "seeds", "shape", "dtype", "encoding",
                         "generator", "gen_seconds", "n", "client", "rank", "world_size", "service",
                         "heartbeat_ms", "code", "message"])
_types = st.sampled_from(["hello", "welcome", "credit", "group", "heartbeat", "error", "bye", "other"])


def _decode_only_protocol_errors(frames):
    try:
        decode(frames)
    except ProtocolError as exc:
        assert exc.code in ("version", "bad_message", "too_large")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_random_bytes(frames):
    _decode_only_protocol_errors(frames)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=10), _types, st.sampled_from([1, 1, 1, 0, 2, "1", None]),
       st.lists(st.binary(max_size=64), max_size=3))
def test_structured_headers(header, msg_type, version, payload):
    header = {**header, "type": msg_type, "v": version}
    _decode_only_protocol_errors([msgpack.packb(header, use_bin_type=True), *payload])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(-5, 2**40), min_size=0, max_size=6), st.lists(st.integers(0, 2**64 - 1), max_size=4),
       st.binary(max_size=300))
def test_group_shapes_never_allocate_beyond_payload(shape, seeds, payload):
    header = {"v": 1, "type": "group", "group_id": "g", "caption_id": 0, "caption": "", "seeds": seeds,
              "shape": shape, "dtype": "uint8", "encoding": "raw", "generator": "", "gen_seconds": 0.0}
    _decode_only_protocol_errors([msgpack.packb(header), payload])
