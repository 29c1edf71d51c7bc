"""What a service does with ``feedback``: each client's pace, and the merged score of every caption.

- ``FeedbackAllowance``: a token bucket per client. A client may send ``burst`` feedback messages
  at once and one more per heartbeat interval; what comes faster is dropped and counted (no
  ``error``: a trainer that sends too often is not answered with a storm).
- ``FeedbackBoard``: the scores of all clients merged into one exponential moving average per
  caption the service serves (``score <- (1 - weight) * score + weight * reported``; a caption's
  first report sets it). Ids the service does not serve are ignored and counted. The service
  reads what changed with ``take()`` and steers its caption policy with it.
- ``refuses_feedback``: how a client tells that a service takes no feedback at all (an older v1
  service, or one started without a board): its ``error`` names the type as unknown.
- ``feedback_message``: a trainer's ids and scores as a checked message.
"""
from __future__ import annotations

import numbers
import threading
from typing import Any, Container, Iterable, Mapping

from .bounds import short
from .codec import encode, unknown_type_message
from .errors import ProtocolError
from .messages import MESSAGE_TYPES, Feedback

#: Feedback messages a client may send at once; after that, one per heartbeat interval.
DEFAULT_FEEDBACK_BURST = 4

#: Weight of a new report in a caption's moving average.
DEFAULT_FEEDBACK_WEIGHT = 0.5


class FeedbackAllowance:
    """One client's token bucket: ``burst`` tokens, refilled at one per ``interval_s`` seconds."""

    def __init__(self, burst: int, interval_s: float, now: float) -> None:
        self.burst = burst
        self.interval_s = interval_s
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> bool:
        """Spend a token if one is left (True), else False: the message is dropped."""
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(float(self.burst), self.tokens + elapsed / self.interval_s)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class FeedbackBoard:
    """The merged feedback of every client: one moving average per caption id served.

    Thread-safe: the server's I/O thread calls ``merge``; the service calls ``take``/``scores``.

    Args:
        served: the caption ids the service serves (a set, a ``range``: anything with ``in``).
        weight: the weight of a new report in a caption's average, in (0, 1].
    """

    def __init__(self, served: Container[int], weight: float = DEFAULT_FEEDBACK_WEIGHT) -> None:
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"feedback weight must be in (0, 1], got {weight}")
        self.served = served
        self.weight = float(weight)
        self._lock = threading.Lock()
        self._scores: dict[int, float] = {}
        self._changed: set[int] = set()

    def merge(self, caption_ids: Iterable[int], scores: Iterable[float]) -> int:
        """Fold one client's report into the averages; returns how many ids were not served (ignored)."""
        unknown = 0
        with self._lock:
            for caption_id, score in zip(caption_ids, scores):
                if caption_id not in self.served:
                    unknown += 1
                    continue
                old = self._scores.get(caption_id)
                self._scores[caption_id] = float(score) if old is None else old + self.weight * (float(score) - old)
                self._changed.add(caption_id)
        return unknown

    def take(self) -> dict[int, float]:
        """The merged score of every caption whose average changed since the last ``take``."""
        with self._lock:
            changed = {caption_id: self._scores[caption_id] for caption_id in self._changed}
            self._changed.clear()
        return changed

    def scores(self) -> dict[int, float]:
        """Every caption's merged score (a copy)."""
        with self._lock:
            return dict(self._scores)

    def restore(self, scores: Mapping[int, float]) -> None:
        """Start from saved averages (a restart); served ids only, nothing marked as changed."""
        with self._lock:
            self._scores = {int(c): float(s) for c, s in scores.items() if int(c) in self.served}
            self._changed.clear()


def refusal_of_feedback_type() -> str:
    """The ``error`` text of a service that takes no feedback: what an older v1 service's codec says."""
    return unknown_type_message(Feedback.TYPE, known=[t for t in MESSAGE_TYPES if t != Feedback.TYPE])


def refuses_feedback(code: str, message: str) -> bool:
    """Whether an ``error`` from a service says it does not know the ``feedback`` type at all."""
    return code == "bad_message" and message.startswith(f"header.type = {short(Feedback.TYPE)} is unknown")



def feedback_message(caption_ids: Iterable[Any], scores: Iterable[Any]) -> Feedback:
    """A checked ``Feedback`` from a trainer's ids and scores (Python or numpy numbers).

    Raises ``ValueError`` naming the entry at fault: an id that is not an int, a score that is not
    a finite number >= 0, lengths that differ, no entry or more than ``MAX_FEEDBACK_ENTRIES``.
    """
    ids, values = list(caption_ids), list(scores)
    for index, caption_id in enumerate(ids):
        if isinstance(caption_id, bool) or not isinstance(caption_id, numbers.Integral):
            raise ValueError(f"feedback caption_ids[{index}] = {short(caption_id)} is not an int")
    for index, score in enumerate(values):
        if isinstance(score, bool) or not isinstance(score, numbers.Real):
            raise ValueError(f"feedback scores[{index}] = {short(score)} is not a number")
    msg = Feedback([int(c) for c in ids], [float(s) for s in values])
    try:
        encode(msg)
    except ProtocolError as exc:
        raise ValueError(exc.message) from None
    return msg
