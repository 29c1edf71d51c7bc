"""The steering loop: merged feedback reaches the policy before each draw, and the policy's scores
reach the state file, from which a restart (without a clean close) restores policy and board."""
from __future__ import annotations

import json

import pytest

from generator_service.caption_policy import CaptionPolicyConfig, build_policy
from generator_service.caption_steering import CaptionSteering
from generator_service.online_state import STATE_FILE, OnlineState, OnlineStateError, RunIdentity
from protocol.feedback import FeedbackBoard

CAPTION_IDS = list(range(10, 30))
IDENTITY = RunIdentity(fingerprint="f" * 16, seed=0, images_per_group=2, captions_digest="d" * 16,
                       caption_count=len(CAPTION_IDS))
HARD = CaptionPolicyConfig("hard")


def _steering(directory, name="hard", save_every_s=0.0):
    policy = build_policy(CaptionPolicyConfig(name), CAPTION_IDS)
    board = FeedbackBoard(set(CAPTION_IDS))
    state = OnlineState(directory, IDENTITY, lease=4, policy_state=policy.state_dict).open()
    steering = CaptionSteering(policy, board, state, save_every_s=save_every_s, take_every_s=0.0)
    steering.restore()
    return steering, state


def test_feedback_reaches_the_policy_and_the_state_file_and_a_restart_restores_both(tmp_path):
    steering, state = _steering(tmp_path)
    positions = state.positions()
    drawn = [steering.draw(next(positions))]
    steering.board.merge([12, 13, 99], [5.0, 1.0, 3.0])
    drawn += [steering.draw(next(positions)) for _ in range(6)]
    steering.tick()
    assert steering.policy.scored() == {12: 5.0, 13: 1.0} and steering.scores_taken == 2
    saved = json.loads((tmp_path / STATE_FILE).read_text())["policy"]
    assert saved["scores"] == [[12, 5.0], [13, 1.0]] and saved["policy"] == "hard"
    # no close(): as after kill -9
    again, reopened = _steering(tmp_path)
    assert again.policy.scored() == {12: 5.0, 13: 1.0} and again.board.scores() == {12: 5.0, 13: 1.0}
    after = [again.draw(p) for p in range(reopened.start_position, reopened.start_position + 50)]
    assert not set(drawn) & set(after)


def test_scores_wait_for_the_save_interval(tmp_path):
    steering, state = _steering(tmp_path, save_every_s=3600.0)
    positions = state.positions()
    steering.board.merge([12], [5.0])
    steering.draw(next(positions))
    steering.tick()
    assert json.loads((tmp_path / STATE_FILE).read_text())["policy"]["scores"] == []
    state.close()
    assert json.loads((tmp_path / STATE_FILE).read_text())["policy"]["scores"] == [[12, 5.0]]


def test_a_state_of_the_hard_policy_is_refused_by_the_uniform_walk_naming_the_file(tmp_path):
    steering, state = _steering(tmp_path)
    steering.draw(next(state.positions()))
    state.close()
    with pytest.raises(OnlineStateError, match=r"online_state.json: this run drew captions with the 'hard' policy"):
        _steering(tmp_path, name="uniform")


def test_a_tick_without_draws_takes_and_saves_new_scores(tmp_path):
    """While the queue is full nothing is drawn; the run's ticks still bring the scores to the file."""
    steering, state = _steering(tmp_path)
    steering.board.merge([20], [2.5])
    steering.tick()
    assert json.loads((tmp_path / STATE_FILE).read_text())["policy"]["scores"] == [[20, 2.5]]


def test_new_scores_are_taken_at_most_once_per_take_interval(tmp_path):
    """Each take costs the hard policy a pass over its captions: a flood of feedback cannot make every
    draw pay it. Ticks of a made-up clock, no waiting."""
    now = [0.0]
    policy = build_policy(HARD, CAPTION_IDS)
    steering = CaptionSteering(policy, FeedbackBoard(set(CAPTION_IDS)), take_every_s=1.0, clock=lambda: now[0])
    steering.board.merge([11], [1.0])
    steering.draw(0)
    steering.board.merge([12], [2.0])
    steering.draw(1)
    now[0] = 0.5
    steering.tick()
    assert policy.scored() == {11: 1.0}
    now[0] = 1.0
    steering.tick()
    assert policy.scored() == {11: 1.0, 12: 2.0}
