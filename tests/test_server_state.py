"""The service's per-client bookkeeping: acknowledgement and the choice of a session to evict."""
from __future__ import annotations

from protocol.server_state import ClientInfo, SentGroup, chosen_routing_id, evictable


def _client(unacked: list[str] = (), followed_up: bool = True, last_seen: float = 0.0) -> ClientInfo:
    client = ClientInfo("trainer", 0, 1, last_seen=last_seen, followed_up=followed_up)
    for group_id in unacked:
        client.unacked.append(SentGroup(group_id, [b"x" * 10], 10))
        client.unacked_bytes += 10
    return client


def test_acknowledge_forgets_up_to_the_named_group():
    client = _client(["g1", "g2", "g3"])
    assert client.acknowledge("g2") == 2
    assert [s.group_id for s in client.unacked] == ["g3"]
    assert client.unacked_bytes == 10


def test_acknowledge_of_an_unknown_or_empty_id_forgets_nothing():
    client = _client(["g1", "g2"])
    assert client.acknowledge("not-sent") is None
    assert client.acknowledge("") == 0
    assert [s.group_id for s in client.unacked] == ["g1", "g2"]
    assert client.unacked_bytes == 20


def test_evictable_prefers_half_open_sessions_and_spares_unacknowledged_groups():
    clients = {
        b"\0busy1": _client(["g1"], followed_up=False, last_seen=0.0),  # holds a group: never evicted
        b"\0idle1": _client(followed_up=True, last_seen=1.0),            # silent 9 s > 5 s
        b"\0half1": _client(followed_up=False, last_seen=8.0),           # never followed up its hello
        b"\0live1": _client(followed_up=True, last_seen=9.5),
    }
    assert evictable(clients, now=10.0, idle_after=5.0) == b"\0half1"
    del clients[b"\0half1"]
    assert evictable(clients, now=10.0, idle_after=5.0) == b"\0idle1"
    del clients[b"\0idle1"]
    assert evictable(clients, now=10.0, idle_after=5.0) is None


def test_chosen_routing_id():
    assert not chosen_routing_id(b"\0\x01\x02\x03\x04")
    assert chosen_routing_id(b"trainer-0")
    assert chosen_routing_id(b"\x01\x01\x02\x03\x04")
