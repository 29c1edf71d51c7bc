"""Caption policies: the uniform walk is today's, the hard policy draws by the trainers' scores,
deterministically, and both keep their scores (and the hard one its epochs) across a restart."""
from __future__ import annotations

import json

import numpy as np
import pytest

from generator_service.caption_policy import (
    CAPTION_POLICIES,
    DEFAULT_HARD_ALPHA,
    DEFAULT_HARD_FLOOR,
    CaptionPolicyConfig,
    build_policy,
)
from generator_service.online_state import OnlineState, RunIdentity

CAPTION_IDS = [100 + 3 * i for i in range(20)]  # ids are not positions
HARD = CaptionPolicyConfig("hard")


def _marked(policy, hard_id: int, others: float = 1.0, factor: float = 100.0):
    policy.update({c: (factor * others if c == hard_id else others) for c in CAPTION_IDS})
    return policy


def test_the_choices_come_from_one_registry():
    assert CAPTION_POLICIES.names() == ["hard", "uniform"]
    assert CaptionPolicyConfig().name == "uniform"
    with pytest.raises(ValueError, match=r"unknown caption policy 'hardest'; choose one of: hard, uniform"):
        CaptionPolicyConfig("hardest")
    with pytest.raises(ValueError, match=r"--hard-floor must be a finite number >= 0, got -0.5"):
        CaptionPolicyConfig("hard", hard_floor=-0.5)  # floor 0 is allowed: no floor at all
    with pytest.raises(ValueError, match=r"--hard-alpha must be a finite number > 0, got nan"):
        CaptionPolicyConfig("hard", hard_alpha=float("nan"))


def test_uniform_is_the_walk_of_positions_whatever_the_scores():
    policy = _marked(build_policy(CaptionPolicyConfig(), CAPTION_IDS, seed=3), CAPTION_IDS[4])
    assert [policy.draw(p) for p in range(70)] == [(p % 20, p // 20) for p in range(70)]


def test_hard_with_the_defaults_gives_a_caption_scored_100x_at_least_5x_its_uniform_share():
    assert (DEFAULT_HARD_FLOOR, DEFAULT_HARD_ALPHA) == (1.0, 1.0)
    hard_id = CAPTION_IDS[7]
    policy = _marked(build_policy(HARD, CAPTION_IDS, seed=11), hard_id)
    draws = [policy.draw(p) for p in range(4000)]
    share = sum(1 for index, _ in draws if CAPTION_IDS[index] == hard_id) / len(draws)
    assert share >= 5 * (1 / len(CAPTION_IDS)), share
    # every other caption is still drawn: the floor keeps each one's chance
    assert {index for index, _ in draws} == set(range(len(CAPTION_IDS)))


def test_hard_without_a_floor_draws_by_relative_score_alone_and_never_all_zero_weights():
    sharp = CaptionPolicyConfig("hard", hard_floor=0.0, hard_alpha=4.0)
    policy = build_policy(sharp, CAPTION_IDS, seed=5)
    policy.update({CAPTION_IDS[0]: 0.0, CAPTION_IDS[1]: 2.0, CAPTION_IDS[2]: 4.0})  # the rest unscored: median 2
    weights = policy.weights()
    assert weights[0] == 0.0 and weights[1] == pytest.approx(1.0) and weights[2] == pytest.approx(16.0)
    assert np.allclose(weights[3:], 1.0)
    drawn = {index for index, _ in (policy.draw(p) for p in range(2000))}
    assert 0 not in drawn and {1, 2} <= drawn  # a caption scored 0 weighs nothing without a floor
    zeros = build_policy(sharp, CAPTION_IDS, seed=5)
    zeros.update({c: 0.0 for c in CAPTION_IDS})  # every weight would be 0: the policy draws uniformly
    assert np.allclose(zeros.weights(), 1.0)
    assert len({index for index, _ in (zeros.draw(p) for p in range(2000))}) == len(CAPTION_IDS)


def test_hard_does_not_depend_on_the_scores_units():
    small = _marked(build_policy(HARD, CAPTION_IDS), CAPTION_IDS[2], others=1e-4)
    large = _marked(build_policy(HARD, CAPTION_IDS), CAPTION_IDS[2], others=1e3)
    assert np.allclose(small.weights(), large.weights())
    assert [small.draw(p) for p in range(200)] == [large.draw(p) for p in range(200)]


def test_an_unscored_caption_takes_the_median_score():
    policy = build_policy(HARD, CAPTION_IDS)
    policy.update({CAPTION_IDS[0]: 1.0, CAPTION_IDS[1]: 2.0, CAPTION_IDS[2]: 30.0})
    weights = policy.weights()
    assert np.allclose(weights[3:], weights[1])  # the median of 1, 2, 30 is 2
    assert weights[2] > weights[1] > weights[0]
    unscored = build_policy(HARD, CAPTION_IDS)
    assert np.allclose(unscored.weights(), unscored.weights()[0])  # nothing scored: all alike


def test_scores_outside_the_set_or_not_finite_are_skipped():
    policy = build_policy(HARD, CAPTION_IDS)
    assert policy.update({5: 1.0, CAPTION_IDS[0]: float("nan"), CAPTION_IDS[1]: -1.0, CAPTION_IDS[2]: 4.0}) == 1
    assert policy.scored() == {CAPTION_IDS[2]: 4.0}


def test_caption_ids_in_any_order_find_their_index_and_unknown_ids_none():
    policy = build_policy(HARD, [50, 7, 900, 12, 7])  # unsorted, 7 listed twice: its last index, as a dict would
    assert [policy.index_of(c) for c in (50, 7, 900, 12)] == [0, 4, 2, 3]
    assert policy.index_of(8) is None and policy.index_of(-1) is None and policy.index_of(901) is None
    assert policy.update({900: 2.0, 8: 1.0}) == 1 and policy.scored() == {900: 2.0}


def test_hard_is_deterministic_given_the_seed_and_each_group_is_a_new_epoch():
    runs = []
    for seed in (5, 5, 6):
        policy = _marked(build_policy(HARD, CAPTION_IDS, seed=seed), CAPTION_IDS[0])
        runs.append([policy.draw(p) for p in range(500)])
    assert runs[0] == runs[1] and runs[0] != runs[2]
    for draws in runs:
        assert len(set(draws)) == len(draws)  # no (caption, epoch) twice: fresh seeds, unique ids
        for index in range(len(CAPTION_IDS)):
            epochs = [epoch for i, epoch in draws if i == index]
            assert epochs == list(range(len(epochs)))


def _through_json(state):
    return json.loads(json.dumps(state))


def test_state_round_trip_continues_the_same_draws():
    original = _marked(build_policy(HARD, CAPTION_IDS, seed=9), CAPTION_IDS[3])
    first = [original.draw(p) for p in range(100)]
    state = _through_json(original.state_dict(100))
    restored = build_policy(HARD, CAPTION_IDS, seed=9)
    restored.load_state_dict(state, 100)
    assert restored.scored() == original.scored()
    assert [restored.draw(p) for p in range(100, 300)] == [original.draw(p) for p in range(100, 300)]
    assert len(set(first)) == 100


def test_a_restart_past_the_saved_position_never_repeats_an_epoch():
    """After a kill -9 the run restarts at its leased position: draws made after the last save are
    lost, so every caption's epochs jump by the positions in between."""
    original = _marked(build_policy(HARD, CAPTION_IDS, seed=2), CAPTION_IDS[5])
    before = [original.draw(p) for p in range(60)]
    state = _through_json(original.state_dict(60))
    lost = [original.draw(p) for p in range(60, 90)]  # handed out, then the process was killed
    restored = build_policy(HARD, CAPTION_IDS, seed=2)
    restored.load_state_dict(state, 90)
    after = [restored.draw(p) for p in range(90, 400)]
    assert len(set(before + lost + after)) == len(before) + len(lost) + len(after)


def test_a_switch_between_policies_keeps_scores_and_never_repeats_an_epoch():
    uniform = _marked(build_policy(CaptionPolicyConfig(), CAPTION_IDS), CAPTION_IDS[1])
    walked = [uniform.draw(p) for p in range(47)]
    hard = build_policy(HARD, CAPTION_IDS)
    hard.load_state_dict(_through_json(uniform.state_dict(47)), 47)
    assert hard.scored() == uniform.scored()
    drawn = [hard.draw(p) for p in range(47, 300)]
    assert len(set(walked + drawn)) == len(walked) + len(drawn)
    back = build_policy(CaptionPolicyConfig(), CAPTION_IDS)
    with pytest.raises(ValueError, match=r"this run drew captions with the 'hard' policy.*--caption-policy hard"):
        back.load_state_dict(_through_json(hard.state_dict(300)), 300)


@pytest.mark.parametrize("state, message", [
    ({"policy": "hard", "position": 5, "scores": [[1, "x"]]}, r"'scores' must be a list of \[caption_id, score >= 0\]"),
    ({"policy": "hard", "position": 5, "counts": {"1": 2}}, r"'counts' must be a list of \[caption_id, count >= 0\]"),
    ({"policy": "hard", "position": 50}, r"'position' must be an int in \[0, 10\], got 50"),
])
def test_a_damaged_state_is_refused_naming_the_field(state, message):
    with pytest.raises(ValueError, match=message):
        build_policy(HARD, CAPTION_IDS).load_state_dict(state, 10)


def test_the_online_state_file_keeps_the_policy_across_a_restart_without_close(tmp_path):
    """The lease file stores the policy's state at every write and on ``save()``; reopened without a
    clean ``close()`` (as after kill -9), it gives the scores back, and the restored epochs jump
    past every position leased."""
    identity = RunIdentity(fingerprint="f" * 16, seed=1, images_per_group=2, captions_digest="d" * 16,
                           caption_count=len(CAPTION_IDS))
    policy = _marked(build_policy(HARD, CAPTION_IDS, seed=1), CAPTION_IDS[0])
    state = OnlineState(tmp_path, identity, lease=8, policy_state=policy.state_dict).open()
    positions = state.positions()
    served = [policy.draw(next(positions)) for _ in range(13)]
    policy.update({CAPTION_IDS[1]: 50.0})
    state.save()  # new scores reach the file between leases
    served += [policy.draw(next(positions)) for _ in range(2)]
    again = OnlineState(tmp_path, identity, lease=8).open()  # no close(): the process was killed
    assert again.start_position == 16 and again.saved_policy["policy"] == "hard"
    restored = build_policy(HARD, CAPTION_IDS, seed=1)
    restored.load_state_dict(again.saved_policy, again.start_position)
    assert restored.scored() == policy.scored()
    after = [restored.draw(p) for p in range(16, 200)]
    assert len(set(served + after)) == len(served) + len(after)
