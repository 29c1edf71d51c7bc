"""The service's per-client bookkeeping: acknowledgement, admission, credit and the choice of a session to evict."""
from __future__ import annotations

from protocol.routing_ids import counter_of
from protocol.server_state import ClientInfo, ClientTable, SentGroup, evictable


def _client(unacked: list[str] = (), settled_at: float = 0.0, credits: int = 0, groups_sent: int = 0) -> ClientInfo:
    client = ClientInfo("trainer", 0, 1, settled_at=settled_at, credits=credits, groups_sent=groups_sent)
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


def test_an_ack_that_empties_the_unacknowledged_groups_marks_when():
    client = _client(["g1", "g2"], settled_at=1.0)
    client.acknowledge("g1", now=5.0)
    assert client.settled_at == 1.0
    client.acknowledge("g2", now=7.0)
    assert client.settled_at == 7.0


def test_evictable_takes_the_longest_settled_session_and_never_one_that_streams():
    clients = {
        b"\0busy1": _client(["g1"], settled_at=0.0),                      # holds a group: streams
        b"\0feed1": _client(settled_at=0.5, credits=4, groups_sent=9),    # received groups, waits for more
        b"\0idle1": _client(settled_at=1.0, credits=4),                   # credit, heartbeats, never a group
        b"\0half1": _client(settled_at=8.0),                              # hello only
        b"\0done1": _client(settled_at=9.5, groups_sent=3),               # took groups, grants no more
    }
    assert evictable(clients) == b"\0idle1"
    del clients[b"\0idle1"]
    assert evictable(clients) == b"\0half1"
    del clients[b"\0half1"]
    assert evictable(clients) == b"\0done1"
    del clients[b"\0done1"]
    assert evictable(clients) is None


def test_the_table_admits_up_to_max_clients_evicting_an_idle_session_never_a_streaming_one():
    table = ClientTable(max_queue=4, max_credit=8, max_clients=2, max_client_bytes=100)
    assert table.admit(b"\0a", "a", 0, 1, now=1.0) and table.admit(b"\0b", "b", 0, 1, now=2.0)
    table.clients[b"\0a"].unacked.append(SentGroup("g1", [b"x"], 1))  # a streams; b only said hello
    assert table.admit(b"\0c", "c", 0, 1, now=3.0)
    assert list(table.clients) == [b"\0a", b"\0c"] and list(table.rr) == [b"\0a", b"\0c"]
    assert table.stats.evicted_clients == 1
    table.clients[b"\0c"].unacked.append(SentGroup("g2", [b"y"], 1))
    assert not table.admit(b"\0d", "d", 0, 1, now=4.0)
    assert table.stats.refused_clients == 1 and b"\0d" not in table.clients


def test_the_table_clamps_credit_and_requeues_what_a_leaving_client_did_not_acknowledge():
    table = ClientTable(max_queue=4, max_credit=3, max_clients=2, max_client_bytes=100)
    table.admit(b"\0a", "a", 0, 1, now=0.0)
    client = table.clients[b"\0a"]
    for group_id in ("g1", "g2"):
        client.unacked.append(SentGroup(group_id, [group_id.encode()], 2))
        client.unacked_bytes += 2
    assert table.grant(client, 5, ack="g1", now=1.0) == 2  # g1 acknowledged: g2 plus 2 credits = max_credit
    assert client.credits == 2 and table.stats.credit_clamped == 1 and table.stats.acked == 1
    table.drop(b"\0a", "left")
    assert [group_id for group_id, _ in table.queue] == ["g2"] and table.stats.requeued == 1
    assert table.stats.left_clients == 1 and not table.clients and not table.rr


def test_counter_of_reads_only_the_generated_shape():
    assert counter_of(b"\0\x01\x02\x03\x04") == 0x01020304
    assert counter_of(b"trainer-0") is None
    assert counter_of(b"\x01\x01\x02\x03\x04") is None
    assert counter_of(b"\0\x01\x02\x03") is None
