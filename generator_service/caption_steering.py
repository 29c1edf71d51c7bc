"""The loop between trainers and the caption policy of an endless online run.

The server merges the trainers' ``feedback`` (``protocol.feedback.FeedbackBoard``); before each
draw and on every tick of the run (at most once per ``take_every_s``), ``CaptionSteering`` hands
what changed to the policy, and on a tick at most ``save_every_s`` seconds after new scores it has
the run's state file (``OnlineState.save``) store the policy, so a restart (even after ``kill -9``)
keeps the scores.
Draws and ticks happen on the one thread that hands out work.
"""
from __future__ import annotations

import time
from typing import Callable

from generator_service.caption_policy import CaptionPolicy
from generator_service.online_state import OnlineState, OnlineStateError
from protocol.feedback import FeedbackBoard

#: Most seconds new scores wait before they are written to the state file.
DEFAULT_SAVE_EVERY_S = 10.0

#: Least seconds between two takes of new scores: each changes the policy's weights, which cost a
#: pass over the caption set (O(N)) at the next draw.
DEFAULT_TAKE_EVERY_S = 1.0


class CaptionSteering:
    """Draws positions through ``policy``, fed by ``board``, its state kept by ``state``.

    Args:
        policy: the run's caption policy.
        board: the server's merged feedback (None: no server, scores stay as restored).
        state: the run's state file (None: nothing kept across a restart).
        save_every_s: most seconds new scores wait before they are written.
        take_every_s: least seconds between two takes of new scores from the board.
        clock: seconds, monotonic (``time.monotonic``).
    """

    def __init__(self, policy: CaptionPolicy, board: FeedbackBoard | None = None, state: OnlineState | None = None,
                 save_every_s: float = DEFAULT_SAVE_EVERY_S, take_every_s: float = DEFAULT_TAKE_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.board = board
        self.state = state
        self.save_every_s = save_every_s
        self.take_every_s = take_every_s
        self.clock = clock
        self.scores_taken = 0
        self._unsaved = False
        self._saved_at = clock()
        self._taken_at = float("-inf")

    def restore(self) -> None:
        """Load the policy the state file held (a file without one was a ``uniform`` run) and start the
        board from its scores. Raises ``OnlineStateError`` naming the file for a state it cannot use."""
        if self.state is None:
            return
        start = self.state.start_position
        saved = self.state.saved_policy or {"policy": "uniform", "position": start}
        try:
            self.policy.load_state_dict(saved, start)
        except (ValueError, TypeError) as exc:
            raise OnlineStateError(f"{self.state.path}: {exc}") from None
        if self.board is not None:
            self.board.restore(self.policy.scored())

    def tick(self) -> None:
        """Take new scores and write them when due (the run calls it on the thread that draws, also
        while no work is handed out: scores reach the state file while the queue is full)."""
        self._take()
        if self._unsaved and self.state is not None and self.clock() - self._saved_at >= self.save_every_s:
            # Every position handed out was drawn: the stored epochs count them all.
            self.state.save()
            self._unsaved = False
            self._saved_at = self.clock()

    def draw(self, position: int) -> tuple[int, int]:
        """``(index, epoch)`` of the caption handed out at ``position``, the latest scores taken first."""
        self._take()
        return self.policy.draw(position)

    def _take(self) -> None:
        if self.board is not None and self.clock() - self._taken_at >= self.take_every_s:
            self._taken_at = self.clock()
            changed = self.board.take()
            if changed:
                self.scores_taken += self.policy.update(changed)
                self._unsaved = True
