"""``feedback`` over real sockets on 127.0.0.1: hostile reports are refused while a good client
streams, unknown ids and reports over a client's pace are counted (not answered), the reports of
several clients are merged, and a client stops sending feedback to a service that predates it.

Whether a report was answered is told by order, never by waiting: a DEALER's messages are handled in
the order sent, so the first answer to "report, then a bad credit" is about the credit if the report
got none.
"""
from __future__ import annotations

import logging
import math

import msgpack
import pytest
import zmq

from generator_service.config import GeneratorConfig
from protocol import Error, Heartbeat, Hello, Welcome, decode, encode
from protocol.client import GroupClient
from protocol.codec import unknown_type_message
from protocol.feedback import FeedbackBoard, feedback_message, refusal_of_feedback_type, refuses_feedback
from protocol.limits import MAX_CAPTION_ID, MAX_FEEDBACK_ENTRIES
from protocol.messages import MESSAGE_TYPES
from protocol.server import GroupServer
from tests.polling import wait_for
from tests.test_protocol_attacks import Collector, _put, _raw

GENERATOR = GeneratorConfig(images_per_group=2, save_size=32).welcome_info()
SERVED = range(100)
#: long enough that no client's allowance refills while a test runs (counts stay exact)
SLOW_HB_MS = 60_000


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _server(board: FeedbackBoard | None, heartbeat_ms: int = SLOW_HB_MS, burst: int = 4) -> GroupServer:
    return GroupServer("tcp://127.0.0.1:*", "feedback", GENERATOR, heartbeat_ms=heartbeat_ms, max_queue=64,
                       max_credit=16, max_clients=16, max_client_bytes=256 * 1024, feedback=board,
                       feedback_burst=burst).start()


@pytest.fixture
def board():
    return FeedbackBoard(SERVED)


@pytest.fixture
def server(board):
    srv = _server(board)
    yield srv
    srv.close()


def _welcomed(context: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = _raw(context, endpoint)
    sock.send_multipart(encode(Hello(client="raw")))
    assert isinstance(_answer(sock), Welcome)
    return sock


def _answer(sock: zmq.Socket, timeout_ms: int = 20_000) -> object:
    """The next message that is not a heartbeat."""
    while True:
        assert sock.poll(timeout_ms), "no answer"
        msg = decode(sock.recv_multipart())
        if not isinstance(msg, Heartbeat):
            return msg


def _report(ids, scores) -> bytes:
    return msgpack.packb({"v": 1, "type": "feedback", "caption_ids": ids, "scores": scores})


def _unanswered(sock: zmq.Socket) -> None:
    """Nothing was answered to what ``sock`` sent before: the first answer is the probe's."""
    sock.send_multipart([msgpack.packb({"v": 1, "type": "credit", "n": 0})])
    answer = _answer(sock)
    assert isinstance(answer, Error) and answer.message.startswith("credit.n = 0"), answer


HOSTILE = {
    "nan": _report([1], [math.nan]),
    "inf": _report([1], [math.inf]),
    "-inf": _report([1], [-math.inf]),
    "negative": _report([1, 2], [1.0, -0.5]),
    "lengths differ": _report([1, 2], [1.0]),
    "nested ids": _report([[1]], [1.0]),
    "nested scores": _report([1], [[1.0]]),
    "ids not a list": _report({"1": 2}, [1.0]),
    "too many": _report(list(range(MAX_FEEDBACK_ENTRIES + 1)), [1.0] * (MAX_FEEDBACK_ENTRIES + 1)),
    "none": _report([], []),
    "float id": _report([1.5], [1.0]),
    "str id": _report(["1"], [1.0]),
    "bool id": _report([True], [1.0]),
    "id out of range": _report([MAX_CAPTION_ID + 1], [1.0]),
    "str score": _report([1], ["1.0"]),
    "bool score": _report([1], [True]),
    "missing scores": msgpack.packb({"v": 1, "type": "feedback", "caption_ids": [1]}),
}


def test_hostile_feedback_is_refused_and_a_good_client_keeps_streaming(server, board, context):
    good = Collector()
    with GroupClient([server.endpoint], good, client_name="good", credits=8, connect_timeout=20) as client:
        _put(server, 0, 30)
        attacker = _welcomed(context, server.endpoint)
        for what, frame in HOSTILE.items():
            attacker.send_multipart([frame])
            answer = _answer(attacker)
            assert isinstance(answer, Error) and answer.code == "bad_message", (what, answer)
            assert answer.message.startswith("feedback"), (what, answer.message)
        stranger = _raw(context, server.endpoint)  # never said hello
        stranger.send_multipart([_report([1], [1.0])])
        answer = _answer(stranger)
        assert isinstance(answer, Error) and answer.code == "bad_message"
        assert answer.message == "feedback from a client that sent no hello"
        attacker.send_multipart([_report([1] * 3000, [1.0] * 3000)])  # over the feedback header limit
        assert _answer(attacker).code == "too_large"
        _put(server, 30, 30)
        wait_for(lambda: len(good) == 60, "the good client's 60 groups")
        attacker.send_multipart([_report([4], [2.0])])  # the attacker is still served too
        wait_for(lambda: server.stats().feedback_merged == 1, "the attacker's good report merged")
        stats = server.stats()
        assert stats.bad_messages == len(HOSTILE) + 2 and stats.dead_clients == 0
        assert client.stats().reconnects == 0 and board.scores() == {4: 2.0}
        server.check()
        attacker.close()
        stranger.close()


def test_ids_the_service_does_not_serve_are_ignored_and_counted(server, board, context):
    sock = _welcomed(context, server.endpoint)
    sock.send_multipart([_report([1, 500, 7, MAX_CAPTION_ID], [3.0, 9.0, 0, 1.0])])
    _unanswered(sock)
    stats = server.stats()
    assert (stats.feedback_merged, stats.feedback_entries, stats.feedback_unknown_ids) == (1, 2, 2)
    assert board.scores() == {1: 3.0, 7: 0.0}
    sock.close()


def test_reports_over_a_clients_pace_are_dropped_and_counted_not_answered(board, context):
    server = _server(board, burst=2)
    try:
        fast, other = _welcomed(context, server.endpoint), _welcomed(context, server.endpoint)
        for i in range(5):
            fast.send_multipart([_report([i], [1.0])])
        _unanswered(fast)
        other.send_multipart([_report([9], [1.0])])  # another client's allowance is its own
        _unanswered(other)
        stats = server.stats()
        assert (stats.feedback_merged, stats.feedback_rate_limited, stats.bad_messages) == (3, 3, 2)
        assert board.scores() == {0: 1.0, 1: 1.0, 9: 1.0}
        fast.close()
        other.close()
    finally:
        server.close()


def test_the_reports_of_two_clients_are_merged_into_one_moving_average(server, board, context):
    first, second = _welcomed(context, server.endpoint), _welcomed(context, server.endpoint)
    first.send_multipart([_report([3, 5], [4.0, 1.0])])
    _unanswered(first)
    second.send_multipart([_report([3, 6], [2.0, 8.0])])
    _unanswered(second)
    assert board.scores() == {3: 3.0, 5: 1.0, 6: 8.0}  # weight 0.5: 4 then 2 -> 3
    assert board.take() == {3: 3.0, 5: 1.0, 6: 8.0}
    first.send_multipart([_report([3], [1.0])])
    _unanswered(first)
    assert board.take() == {3: 2.0}  # only what changed since the last take
    first.close()
    second.close()


def test_send_feedback_reaches_the_board(server, board):
    with GroupClient([server.endpoint], Collector(), connect_timeout=20) as client:
        ids = list(range(90, 100)) + [5000]
        assert client.send_feedback(ids, [float(i) for i in ids])
        wait_for(lambda: server.stats().feedback_merged == 1, "the report merged")
        assert board.scores() == {i: float(i) for i in range(90, 100)}
        assert server.stats().feedback_unknown_ids == 1
        with pytest.raises(ValueError, match=r"feedback\.scores = \[nan\]: must be finite numbers >= 0"):
            client.send_feedback([1], [math.nan])
        with pytest.raises(ValueError, match=r"feedback caption_ids\[0\] = 1\.5 is not an int"):
            client.send_feedback([1.5], [1.0])


def test_a_full_report_fits_the_feedback_header_limit_and_other_headers_keep_theirs(server, board, context):
    ids = [MAX_CAPTION_ID - i for i in range(MAX_FEEDBACK_ENTRIES)]
    frames = encode(feedback_message(ids, [1e300] * MAX_FEEDBACK_ENTRIES))
    assert len(frames[0]) > 18_000
    sock = _welcomed(context, server.endpoint)
    sock.send_multipart(frames)
    _unanswered(sock)
    assert server.stats().feedback_unknown_ids == MAX_FEEDBACK_ENTRIES
    padded = msgpack.packb({"v": 1, "type": "hello", "client": "x" * 5000})
    sock.send_multipart([padded])
    answer = _answer(sock)
    assert answer.code == "too_large" and answer.message == f"header frame is {len(padded)} bytes, limit 4096"
    sock.close()


def test_a_service_without_feedback_answers_as_one_that_predates_it():
    types_before = sorted(t for t in MESSAGE_TYPES if t != "feedback")
    assert refusal_of_feedback_type() == unknown_type_message("feedback", types_before)
    assert refusal_of_feedback_type().startswith("header.type = 'feedback' is unknown; expected one of ['bye', ")
    assert refuses_feedback("bad_message", refusal_of_feedback_type())
    assert not refuses_feedback("bad_message", "feedback.scores = [nan]: must be finite numbers >= 0")


@pytest.mark.parametrize("entries", [3, MAX_FEEDBACK_ENTRIES], ids=["small: unknown type", "full: too large"])
def test_the_client_stops_sending_feedback_to_a_service_that_refuses_it_and_says_so_once(entries, caplog):
    """A service without a board answers ``feedback`` as a v1 service that predates it (an unknown
    type, or a header over its 4 KiB): the client says so once, sends it no more, and the groups
    keep coming on the same session."""
    server = _server(None, heartbeat_ms=200)
    good = Collector()
    try:
        with caplog.at_level(logging.WARNING, logger="protocol.client"):
            with GroupClient([server.endpoint], good, credits=8, connect_timeout=20) as client:
                # a heartbeat from the client means more than an interval passed since its hello: an
                # error now would make it start a new session, were it not about feedback
                wait_for(lambda: server.stats().heartbeats_received >= 1, "a heartbeat from the client")
                for i in range(3):
                    client.send_feedback(list(range(entries)), [float(i)] * entries)
                wait_for(lambda: client.stats().feedback_refused == 1, "the refusal seen")
                sent = client.stats().feedback_sent
                wait_for(lambda: client.stats().errors_from_service == sent, "every report answered")
                assert client.send_feedback([1], [1.0]) is False
                _put(server, 0, 40)
                wait_for(lambda: len(good) == 40, "the 40 groups")
                stats = client.stats()
                assert stats.reconnects == 0 and stats.feedback_sent == sent
                assert server.stats().bad_messages == sent and server.stats().dead_clients == 0
        said = [r for r in caplog.records if "takes no feedback" in r.getMessage()]
        assert len(said) == 1, [r.getMessage() for r in said]
    finally:
        server.close()



def test_a_report_for_one_service_reaches_that_service_alone():
    """Two real services: a report naming one reaches its board only; a report to every service reaches
    both. The client sends a service's reports in order, so the second service's board holding only the
    broadcast means the first report never reached it."""
    boards = [FeedbackBoard(SERVED, weight=1.0), FeedbackBoard(SERVED, weight=1.0)]
    servers = [_server(board) for board in boards]
    try:
        endpoints = [srv.endpoint for srv in servers]
        with GroupClient(endpoints, Collector(), connect_timeout=20) as client:
            assert client.send_feedback([1, 2], [5.0, 6.0], endpoint=endpoints[0])
            assert client.send_feedback([3], [1.0])
            wait_for(lambda: 3 in boards[1].scores() and 3 in boards[0].scores(), "the broadcast on both boards")
            assert boards[0].scores() == {1: 5.0, 2: 6.0, 3: 1.0}
            assert boards[1].scores() == {3: 1.0}
            per_service = client.stats().endpoints
            assert [per_service[url]["feedback_sent"] for url in endpoints] == [2, 1]
            with pytest.raises(ValueError, match=r"endpoint 'tcp://127\.0\.0\.1:1' is not one of this client's"):
                client.send_feedback([1], [1.0], endpoint="tcp://127.0.0.1:1")
    finally:
        for srv in servers:
            srv.close()


def test_one_report_waits_per_service_and_a_newer_one_replaces_only_its_own():
    client = GroupClient(["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], Collector())  # not started: nothing is sent
    try:
        client.send_feedback([1], [1.0], endpoint="tcp://127.0.0.1:1")
        client.send_feedback([1], [2.0], endpoint="tcp://127.0.0.1:2")
        client.send_feedback([1], [3.0])
        assert client.stats().feedback_replaced == 0  # three services' (or every service's) reports wait
        client.send_feedback([1], [4.0], endpoint="tcp://127.0.0.1:1")
        assert client.stats().feedback_replaced == 1
    finally:
        client.close()
