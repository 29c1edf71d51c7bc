"""What the online source tells the generators: each caption's difficulty, to the services that served it.

The training loop hands the source the scores of the captions trained on since its last report
(``trainer.objectives.caption_difficulty``), keyed by the caption ids of the batches. Caption ids are per
service (a service numbers its captions from 0), and the trainer may have replaced them by namespaced ids
(`trainer.data.sources.caption_ids`), so:

- :class:`CaptionOrigins` remembers, for every caption id a batch may carry, the service's own id and the
  endpoints that may have served it: a group names the fingerprint of its generator, and the endpoints
  whose ``welcome`` announced that fingerprint serve the same caption ids (the rule that keeps their ids
  un-namespaced). It keeps the most recent ``limit`` captions.
- :class:`FeedbackOutbox` keeps the scores waiting for each endpoint (a newer score of a caption replaces
  its waiting one) and sends them in messages of at most ``FEEDBACK_CHUNK`` entries, at most one message
  per endpoint every ``interval_s`` seconds (a service takes a few at once, then one per heartbeat
  interval, and drops the rest). Beyond ``limit`` waiting captions per endpoint the oldest are dropped
  and counted. When a service refuses the type (the transport returns False), nothing more is sent to it
  and the source says so once.

The group client sends each service its own report (``send_feedback(..., endpoint=url)``), so services
of different generators (several fingerprints, their caption ids namespaced in batches) each get the
scores of the captions they served, under their own ids. A client that can only reach every service at
once gets reports only when every service numbers the same captions (one fingerprint).
"""
from __future__ import annotations

import collections
import inspect
import logging
import math
import threading
from typing import Any, Callable, Iterable, Mapping

log = logging.getLogger(__name__)

#: Most entries (caption id and score) one ``feedback`` message carries (the protocol's limit).
FEEDBACK_CHUNK = 1024
#: Captions kept waiting per endpoint; beyond it the oldest waiting ones are dropped.
OUTBOX_LIMIT = 16 * FEEDBACK_CHUNK

#: ``send(endpoint, caption_ids, scores) -> bool``: False once the endpoint refuses the type.
#: ``endpoint`` is None when the transport reaches every service at once.
Transport = Callable[[str | None, list[int], list[float]], bool]


class CaptionOrigins:
    """Batch caption id -> (the service's own caption id, the endpoints that may have served it).

    Thread-safe: the client's I/O thread notes, the training loop routes.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(1, int(limit))
        self._lock = threading.Lock()
        self._origins: collections.OrderedDict[int, tuple[int, tuple[str, ...]]] = collections.OrderedDict()

    def note(self, caption_id: int, service_caption_id: int, endpoints: Iterable[str]) -> None:
        """Caption ``caption_id`` (as batches carry it) is ``service_caption_id`` at ``endpoints``."""
        origin = (int(service_caption_id), tuple(endpoints))
        with self._lock:
            self._origins.pop(caption_id, None)
            self._origins[caption_id] = origin
            while len(self._origins) > self.limit:
                self._origins.popitem(last=False)

    def route(self, scores: Mapping[int, float]) -> tuple[dict[str, dict[int, float]], int]:
        """Scores per endpoint, keyed by that service's caption ids; and how many captions had no origin."""
        routed: dict[str, dict[int, float]] = {}
        unknown = 0
        for caption_id, score in scores.items():
            with self._lock:
                origin = self._origins.get(caption_id)
            if origin is None:
                unknown += 1
                continue
            service_id, endpoints = origin
            for endpoint in endpoints:
                routed.setdefault(endpoint, {})[service_id] = float(score)
        return routed, unknown


class FeedbackOutbox:
    """Scores waiting per endpoint, sent in paced messages of at most ``chunk`` entries.

    Args:
        send: the transport (see :data:`Transport`).
        interval_s: least seconds between two messages to one endpoint.
        broadcast: the transport reaches every service at once: everything waits under one key (None).
        chunk: most entries per message.
        limit: most captions waiting per endpoint.
    """

    def __init__(self, send: Transport, interval_s: float, broadcast: bool = False, chunk: int = FEEDBACK_CHUNK,
                 limit: int = OUTBOX_LIMIT) -> None:
        self.send, self.interval_s, self.broadcast = send, float(interval_s), bool(broadcast)
        self.chunk, self.limit = int(chunk), int(limit)
        self._waiting: dict[str | None, collections.OrderedDict[int, float]] = {}
        self._last_sent: dict[str | None, float] = {}
        self.refused: set[str | None] = set()
        self.counts = {"feedback_messages": 0, "feedback_entries": 0, "feedback_dropped": 0}

    def put(self, routed: Mapping[str, Mapping[int, float]]) -> None:
        """Queue scores per endpoint (``CaptionOrigins.route``); a newer score replaces a waiting one."""
        for endpoint, scores in routed.items():
            key = None if self.broadcast else endpoint
            if key in self.refused:
                continue
            box = self._waiting.setdefault(key, collections.OrderedDict())
            for caption_id, score in scores.items():
                box.pop(caption_id, None)
                box[caption_id] = score
            while len(box) > self.limit:
                box.popitem(last=False)
                self.counts["feedback_dropped"] += 1

    def waiting(self) -> int:
        """Entries waiting, over all endpoints."""
        return sum(len(box) for box in self._waiting.values())

    def pump(self, now: float) -> int:
        """Send one message to every endpoint whose interval has passed; returns the messages sent."""
        sent = 0
        for key, box in list(self._waiting.items()):
            if not box or now - self._last_sent.get(key, -float("inf")) < self.interval_s:
                continue
            ids = list(box)[: self.chunk]
            scores = [box[c] for c in ids]
            if not self.send(key, ids, scores):
                self._refuse(key)
                continue
            for caption_id in ids:
                del box[caption_id]
            self._last_sent[key] = now
            self.counts["feedback_messages"] += 1
            self.counts["feedback_entries"] += len(ids)
            sent += 1
        return sent

    def _refuse(self, key: str | None) -> None:
        self.refused.add(key)
        dropped = self._waiting.pop(key, {})
        self.counts["feedback_dropped"] += len(dropped)
        log.warning("caption feedback: %s takes no feedback; sending it none from now on",
                    "no generator service" if key is None else f"generator service {key}")


class SourceFeedback:
    """The online source's feedback: origins of the groups it received and the outbox to their services.

    Args:
        client: the source's ``GroupClient``; its ``send_feedback(caption_ids, scores)`` reaches every
            service (or, taking ``endpoint=``, one); a client without it sends nothing.
        fingerprints: endpoint -> the generator fingerprint its ``welcome`` announced.
        interval_s: least seconds between two messages to one service (its heartbeat interval).
        origins_limit: captions whose origin is kept.
    """

    def __init__(self, client: Any, fingerprints: Mapping[str, str], interval_s: float, origins_limit: int) -> None:
        self.origins = CaptionOrigins(origins_limit)
        self._serving: dict[str, tuple[str, ...]] = {}
        for url, fingerprint in fingerprints.items():
            self._serving[fingerprint] = self._serving.get(fingerprint, ()) + (url,)
        self.unrouted = 0
        self.outbox, self.why_not = _outbox(client, set(fingerprints.values()), interval_s)
        self._said_why = False

    def note(self, caption_id: int, service_caption_id: int, fingerprint: str) -> None:
        """A group of caption ``caption_id`` (``service_caption_id`` at its service) was stored."""
        self.origins.note(caption_id, service_caption_id, self._serving.get(fingerprint, ()))

    def send(self, scores: Mapping[int, float] | None, now: float) -> None:
        """Queue ``scores`` (batch caption id -> score; None: nothing new) and send what the pacing allows."""
        if self.outbox is None:
            if scores and not self._said_why:
                self._said_why = True
                log.warning("caption feedback: none is sent: %s", self.why_not)
            return
        if scores:
            valid = {c: max(0.0, s) for c, s in scores.items() if math.isfinite(s)}
            routed, unknown = self.origins.route(valid)
            self.unrouted += unknown
            self.outbox.put(routed)
        self.outbox.pump(now)

    def counts(self) -> dict[str, int]:
        """Messages and entries sent, entries dropped (waiting too long, or refused), captions without origin."""
        counts = dict(self.outbox.counts) if self.outbox is not None else {}
        if self.outbox is not None:
            counts["feedback_waiting"] = self.outbox.waiting()
        counts["feedback_unrouted"] = self.unrouted
        return counts


def _outbox(client: Any, fingerprints: set[str], interval_s: float) -> tuple[FeedbackOutbox | None, str]:
    """The outbox over ``client``'s ``send_feedback``, or None and why not."""
    send = getattr(client, "send_feedback", None)
    if send is None:
        return None, "this trainer's group client cannot send feedback"
    if "endpoint" in inspect.signature(send).parameters:
        return FeedbackOutbox(lambda url, ids, scores: send(ids, scores, endpoint=url), interval_s), ""
    if len(fingerprints) > 1:  # one report reaches every service, and their caption ids differ
        return None, ("the group client sends one report to every service, and these generators number "
                      "different captions with the same ids (several fingerprints)")
    return FeedbackOutbox(lambda _url, ids, scores: send(ids, scores), interval_s, broadcast=True), ""
