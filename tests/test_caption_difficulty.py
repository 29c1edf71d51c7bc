"""Per-caption difficulty: the multi-positive loss of each anchor, averaged per caption, as a moving average."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.objectives.caption_difficulty import CaptionDifficulty
from trainer.objectives.losses import MultiPosConLoss
from trainer.objectives.methods import caption_loss

T = 0.1
VIEWS = 2  # views per group


def hand_anchor_losses(features: torch.Tensor, labels: list[int]) -> list[float]:
    """Cross-entropy of every anchor with explicit loops: uniform target over the other views of its
    caption, softmax over every other view (self excluded)."""
    z = [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in features.tolist()]
    out = []
    for i, anchor in enumerate(z):
        logits = {j: sum(a * b for a, b in zip(anchor, other)) / T for j, other in enumerate(z) if j != i}
        log_norm = math.log(sum(math.exp(v) for v in logits.values()))
        positives = [j for j in logits if labels[j] == labels[i]]
        out.append(-sum(logits[j] - log_norm for j in positives) / len(positives))
    return out


def step_values(group_ids: list[int], seed: int):
    """One step of ``len(group_ids)`` groups of VIEWS views: (ids, caption_loss [G] from the loss, hand
    per-caption mean over its views in the step)."""
    labels = [c for c in group_ids for _ in range(VIEWS)]  # group-major, as the methods order views
    x = torch.randn(len(labels), 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    _, details = MultiPosConLoss(T)(x, torch.tensor(labels), return_details=True)
    per_group = caption_loss(details["anchor_loss"], len(group_ids))
    rows = hand_anchor_losses(x, labels)
    hand = {c: sum(r for r, lab in zip(rows, labels) if lab == c) / labels.count(c) for c in set(labels)}
    return torch.tensor(group_ids), per_group, hand


def test_scores_equal_a_hand_computation():
    decay = 0.8
    tracker = CaptionDifficulty(decay=decay)
    ids1, loss1, hand1 = step_values([7, 3, 7], seed=0)  # caption 7 in two groups of one step
    ids2, loss2, hand2 = step_values([3, 9, 4], seed=1)
    tracker.add(ids1, loss1)
    tracker.add(ids2, loss2)
    assert tracker.pending_steps == 2 and len(tracker) == 0  # nothing folded before the flush
    scores = tracker.flush()
    expected = {7: hand1[7], 9: hand2[9], 4: hand2[4], 3: decay * hand1[3] + (1 - decay) * hand2[3]}
    assert scores.keys() == expected.keys()
    for caption, value in expected.items():
        assert scores[caption] == pytest.approx(value, rel=1e-9, abs=1e-12), caption
    assert tracker.flush() == {}  # nothing seen since
    ids3, loss3, hand3 = step_values([4], seed=2)
    tracker.add(ids3, loss3)
    assert tracker.flush() == pytest.approx({4: decay * hand2[4] + (1 - decay) * hand3[4]}, rel=1e-9)
    assert tracker.scores()[7] == pytest.approx(hand1[7], rel=1e-9)


def test_the_loss_and_its_gradient_are_the_same_with_the_per_anchor_rows():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3])
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    plain, with_rows = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    loss_plain = MultiPosConLoss(T)(plain, labels)
    loss_rows, details = MultiPosConLoss(T)(with_rows, labels, return_details=True)
    assert torch.equal(loss_plain, loss_rows)
    assert not details["anchor_loss"].requires_grad
    loss_plain.backward()
    loss_rows.backward()
    assert torch.equal(plain.grad, with_rows.grad)
    assert details["anchor_loss"].mean().item() == pytest.approx(loss_rows.item(), rel=1e-6)


def test_the_table_forgets_the_least_recently_seen_caption():
    tracker = CaptionDifficulty(decay=0.5, max_captions=2)
    for ids, values in (([1, 2], [1.0, 2.0]), ([1], [3.0]), ([5], [4.0])):
        tracker.add(torch.tensor(ids), torch.tensor(values))
    assert tracker.flush() == {1: 2.0, 5: 4.0}  # 2 was seen least recently: forgotten
    assert tracker.scores() == {1: 2.0, 5: 4.0}
    state = tracker.state_dict()
    again = CaptionDifficulty(decay=0.5, max_captions=2)
    again.load_state_dict(state)
    assert again.scores() == tracker.scores()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="decay must be in"):
        CaptionDifficulty(decay=1.0)
    with pytest.raises(ValueError, match="must both be"):
        CaptionDifficulty().add(torch.tensor([1, 2]), torch.tensor([1.0]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adding_a_step_on_the_gpu_does_not_wait_for_the_device():
    tracker = CaptionDifficulty()
    ids, values = torch.arange(4, device="cuda"), torch.rand(4, device="cuda")
    anchor_loss = torch.rand(8, device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # any host-device sync raises
    try:
        tracker.add(ids, values)
        tracker.add(ids, caption_loss(anchor_loss, 4))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert set(tracker.flush()) == {0, 1, 2, 3}
