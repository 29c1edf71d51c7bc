"""The loop reports per-caption difficulty to a source that takes feedback, every --feedback-every steps."""
from __future__ import annotations

import math

import torch

from tests.test_train_loop import shards, tiny_config  # noqa: F401  (the module's shard fixture)
from trainer.loop import build_source, train


class FeedbackSource:
    """Delegates to a real source; records the caption ids of each batch and every ``send_feedback`` call."""

    def __init__(self, source) -> None:
        self.source, self.batches, self.reports = source, [], []

    def next_batch(self):
        batch = self.source.next_batch()
        self.batches.append(set(batch.caption_ids.tolist()))
        return batch

    def send_feedback(self, scores) -> None:
        self.reports.append(scores)

    def __getattr__(self, name):
        return getattr(self.source, name)


def run(cfg):
    source = FeedbackSource(build_source(cfg, device=torch.device("cpu"), rank=0, world_size=1, local_captions=16))
    try:
        return train(cfg, source=source), source
    finally:
        source.source.close()


def test_scores_of_the_captions_trained_on_go_to_the_source_every_n_steps(shards, tmp_path):  # noqa: F811
    _, source = run(tiny_config(shards, tmp_path / "on", schedule={"steps": 6, "warmup_steps": 1},
                                      data={"feedback_every": 3}))
    assert len(source.reports) == 6 and len(source.batches) == 6  # called every step, so the source can pace
    assert [r is not None for r in source.reports] == [False, False, True, False, False, True]
    assert set(source.reports[2]) == set.union(*source.batches[:3])
    assert set(source.reports[5]) == set.union(*source.batches[3:])
    assert all(math.isfinite(s) and s > 0 for r in (source.reports[2], source.reports[5]) for s in r.values())

    # (that the scores leave the loss and its gradient as they are is tested on the loss itself: two runs of
    # this loop may differ from the third step on with or without feedback)
    _, quiet = run(tiny_config(shards, tmp_path / "off", schedule={"steps": 3, "warmup_steps": 1},
                               data={"feedback_every": 0}))
    assert quiet.reports == []  # off: nothing kept, nothing sent


def test_a_method_without_a_caption_score_sends_none(shards, tmp_path):  # noqa: F811
    _, source = run(tiny_config(shards, tmp_path / "simclr", method={"name": "simclr"},
                                schedule={"steps": 2, "warmup_steps": 1}, data={"feedback_every": 1}))
    assert source.reports == []
