"""The online source's caption feedback: routing to the services that served a caption, chunks, pacing, refusal."""
from __future__ import annotations

import logging

from trainer.data.sources.caption_feedback import FEEDBACK_CHUNK, CaptionOrigins, FeedbackOutbox, SourceFeedback


class Wire:
    """Records what a transport was given; refuses from the ``refuse_after``-th message on."""

    def __init__(self, refuse_after: int | None = None) -> None:
        self.messages: list[tuple[str | None, list[int], list[float]]] = []
        self.refuse_after = refuse_after

    def send(self, endpoint, ids, scores) -> bool:
        if self.refuse_after is not None and len(self.messages) >= self.refuse_after:
            return False
        self.messages.append((endpoint, list(ids), list(scores)))
        return True


class BroadcastClient:
    """A group client whose ``send_feedback`` reaches every service (no ``endpoint``)."""

    def __init__(self) -> None:
        self.reports: list[tuple[list[int], list[float]]] = []

    def send_feedback(self, caption_ids, scores) -> bool:
        self.reports.append((list(caption_ids), list(scores)))
        return True


class PerEndpointClient:
    """A group client whose ``send_feedback`` names the service."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, list[int], list[float]]] = []

    def send_feedback(self, caption_ids, scores, endpoint=None) -> bool:
        self.reports.append((endpoint, list(caption_ids), list(scores)))
        return True


def test_scores_go_to_the_services_that_served_the_caption_under_their_own_ids():
    origins = CaptionOrigins(limit=10)
    origins.note(9001, 1, ["tcp://a"])  # a namespaced id, the service's own id 1
    origins.note(9002, 1, ["tcp://b"])
    origins.note(7, 7, ["tcp://c", "tcp://d"])  # two services of one fingerprint: the same caption ids
    routed, unknown = origins.route({9001: 0.5, 9002: 2.0, 7: 1.5, 12345: 3.0})
    assert routed == {"tcp://a": {1: 0.5}, "tcp://b": {1: 2.0}, "tcp://c": {7: 1.5}, "tcp://d": {7: 1.5}}
    assert unknown == 1


def test_origins_keep_the_most_recent_captions():
    origins = CaptionOrigins(limit=2)
    for caption in (1, 2, 1, 3):
        origins.note(caption, caption, ["tcp://a"])
    routed, unknown = origins.route({1: 1.0, 2: 1.0, 3: 1.0})
    assert routed == {"tcp://a": {1: 1.0, 3: 1.0}} and unknown == 1  # 2 was noted least recently


def test_messages_hold_at_most_a_chunk_and_one_goes_per_endpoint_per_interval():
    wire = Wire()
    outbox = FeedbackOutbox(wire.send, interval_s=1.0)
    scores = {c: float(c) for c in range(2 * FEEDBACK_CHUNK + 10)}
    outbox.put({"tcp://a": scores, "tcp://b": {5: 0.25}})
    assert outbox.pump(now=100.0) == 2
    assert [(e, len(ids)) for e, ids, _ in wire.messages] == [("tcp://a", FEEDBACK_CHUNK), ("tcp://b", 1)]
    assert outbox.pump(now=100.5) == 0  # within the interval: nothing
    outbox.put({"tcp://a": {0: 9.0, 3000: 1.0}})  # 0 was sent: waits again; 3000 is new
    assert outbox.pump(now=101.0) == 1 and len(wire.messages[-1][1]) == FEEDBACK_CHUNK
    assert outbox.pump(now=102.0) == 1
    sent = [(c, s) for e, ids, scores in wire.messages if e == "tcp://a" for c, s in zip(ids, scores)]
    assert len(sent) == len(scores) + 2 and sent[-2:] == [(0, 9.0), (3000, 1.0)]
    assert dict(sent[:len(scores)]) == scores
    assert outbox.waiting() == 0 and outbox.pump(now=200.0) == 0
    assert outbox.counts == {"feedback_messages": 4, "feedback_entries": len(scores) + 3, "feedback_dropped": 0}


def test_a_newer_score_replaces_a_waiting_one_and_the_oldest_are_dropped_beyond_the_limit():
    wire = Wire()
    outbox = FeedbackOutbox(wire.send, interval_s=1.0, chunk=4, limit=3)
    outbox.put({"tcp://a": {1: 1.0, 2: 2.0, 3: 3.0}})
    outbox.put({"tcp://a": {1: 10.0, 4: 4.0}})  # 1 replaced (now the newest); 2, the oldest, dropped
    outbox.pump(now=0.0)
    assert wire.messages == [("tcp://a", [3, 1, 4], [3.0, 10.0, 4.0])]
    assert outbox.counts["feedback_dropped"] == 1


def test_a_refusing_service_gets_nothing_more_and_it_is_said_once(caplog):
    wire = Wire(refuse_after=1)
    outbox = FeedbackOutbox(wire.send, interval_s=0.0, chunk=2)
    outbox.put({"tcp://old": {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}})
    with caplog.at_level(logging.WARNING, logger="trainer.data.sources.caption_feedback"):
        assert outbox.pump(now=0.0) == 1
        assert outbox.pump(now=1.0) == 0  # refused: its waiting entries are dropped
        outbox.put({"tcp://old": {5: 5.0}})
        assert outbox.pump(now=2.0) == 0
    assert len(wire.messages) == 1 and outbox.refused == {"tcp://old"}
    assert outbox.counts["feedback_dropped"] == 2 and outbox.waiting() == 0
    assert [r.getMessage() for r in caplog.records] == [
        "caption feedback: generator service tcp://old takes no feedback; sending it none from now on"]


def test_the_source_side_broadcasts_only_when_every_service_numbers_the_same_captions(caplog):
    client = BroadcastClient()
    one_kind = SourceFeedback(client, {"tcp://a": "fp1", "tcp://b": "fp1"}, interval_s=0.0, origins_limit=100)
    one_kind.note(3, 3, "fp1")
    one_kind.send({3: 0.75, 99: 1.0}, now=0.0)
    assert client.reports == [([3], [0.75])]  # one report reaches both; 99 never came from them
    assert one_kind.counts()["feedback_unrouted"] == 1

    mixed = SourceFeedback(BroadcastClient(), {"tcp://a": "fp1", "tcp://b": "fp2"}, interval_s=0.0, origins_limit=100)
    mixed.note(123456, 3, "fp1")
    with caplog.at_level(logging.WARNING, logger="trainer.data.sources.caption_feedback"):
        mixed.send({123456: 1.0}, now=0.0)
        mixed.send({123456: 1.0}, now=1.0)
    assert mixed.outbox is None and "several fingerprints" in mixed.why_not
    assert len(caplog.records) == 1 and "none is sent" in caplog.records[0].getMessage()


def test_the_source_side_sends_each_service_its_own_captions_when_the_client_names_the_service():
    client = PerEndpointClient()
    feedback = SourceFeedback(client, {"tcp://a": "fp1", "tcp://b": "fp2"}, interval_s=0.0, origins_limit=100)
    feedback.note(111, 3, "fp1")
    feedback.note(222, 3, "fp2")
    feedback.send({111: 0.5, 222: float("nan")}, now=0.0)  # a non-finite score is not sent
    feedback.send({222: 2.0}, now=1.0)
    assert client.reports == [("tcp://a", [3], [0.5]), ("tcp://b", [3], [2.0])]
