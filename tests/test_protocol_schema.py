"""The header schemas derived from the message classes match the protocol v1 header table."""
from __future__ import annotations

import pytest

from protocol import Group, ProtocolError
from protocol.messages import SCHEMAS, validate_header

#: Protocol v1 (DESIGN.md): per type, its required header fields and their wire kinds, then its optional ones.
V1_HEADERS = {
    "hello": ({"client": "str", "rank": "int", "world_size": "int"}, {}),
    "welcome": ({"service": "str", "generator": "map", "heartbeat_ms": "int"}, {"max_credit": "int"}),
    "credit": ({"n": "int"}, {"ack": "str"}),
    "group": ({"group_id": "str", "caption_id": "int", "caption": "str", "seeds": "list", "shape": "list",
               "dtype": "str", "encoding": "str", "generator": "str", "gen_seconds": "float"}, {}),
    "heartbeat": ({}, {}),
    "error": ({"code": "str", "message": "str"}, {}),
    "bye": ({}, {"ack": "str"}),
    "feedback": ({"caption_ids": "list", "scores": "list"}, {}),
}


@pytest.mark.parametrize("msg_type", sorted(V1_HEADERS))
def test_derived_schema_is_the_v1_header_table(msg_type):
    required, optional = V1_HEADERS[msg_type]
    schema = SCHEMAS[msg_type]
    assert list(schema.required.items()) == list(required.items())  # wire order too
    assert schema.optional == optional


def test_group_header_fields_follow_the_schema_order():
    group = Group(group_id="g", caption_id=0, caption="c", seeds=[1], encoded=[b"x"], encoding="png", shape=(1, 2, 2, 3))
    assert list(group.header_fields()) == list(V1_HEADERS["group"][0])


def test_a_bound_that_reads_another_field_is_checked_after_it():
    # rank's rule reads world_size: a header with both wrong names world_size, the field at fault first
    with pytest.raises(ProtocolError, match=r"hello\.world_size = 0: must be >= 1"):
        validate_header({"type": "hello", "client": "t", "rank": 3, "world_size": 0})
    with pytest.raises(ProtocolError, match=r"hello\.rank = 3: must be in \[0, world_size=2\)"):
        validate_header({"type": "hello", "client": "t", "rank": 3, "world_size": 2})
