"""The trainer's per-caption moving averages are saved in every checkpoint and restored on resume, so a
resumed run's scores go on from the saved ones (a real training run against a real service on 127.0.0.1)."""
from __future__ import annotations

import json
import math

import torch

from protocol import feedback
from tests.train_helpers import SyntheticService
from trainer.train_feedback import DIFFICULTY_KEY, FeedbackReporter, split_difficulty, with_difficulty


class Reports:
    """A source's ``send_feedback``: keeps what it is given."""

    def __init__(self) -> None:
        self.reports: list[dict[int, float] | None] = []

    def send_feedback(self, scores) -> None:
        self.reports.append(scores)


def test_a_checkpointed_reporter_restores_its_averages_and_still_reports_the_captions_it_folded_early():
    source = Reports()
    reporter = FeedbackReporter(source, every=2, decay=0.5)
    reporter.after_step(1, torch.tensor([1, 2]), torch.tensor([1.0, 3.0]))
    reporter.after_step(2, torch.tensor([1, 3]), torch.tensor([2.0, 4.0]))
    reporter.after_step(3, torch.tensor([3, 4]), torch.tensor([6.0, 5.0]))  # not folded yet
    saved = json.loads(json.dumps(with_difficulty({"replay": {"n": 1}}, reporter)))  # as a checkpoint file
    own, difficulty = split_difficulty(saved, rank=0)
    assert own == {"replay": {"n": 1}} and DIFFICULTY_KEY in saved
    assert dict(zip(difficulty["ids"], difficulty["scores"])) == {1: 1.5, 2: 3.0, 3: 5.0, 4: 5.0}

    resumed = FeedbackReporter(Reports(), every=2, decay=0.5)
    resumed.load_state_dict(difficulty)
    assert resumed.difficulty.scores() == reporter.difficulty.scores()
    reporter.after_step(4, torch.tensor([1]), torch.tensor([0.5]))
    assert source.reports[-1] == {3: 5.0, 4: 5.0, 1: 1.0}  # the captions folded for the checkpoint are reported

    ranks = {"ranks": [{"a": 1, DIFFICULTY_KEY: difficulty}, {"a": 2}]}
    assert split_difficulty(ranks, rank=0) == ({"ranks": [{"a": 1}, {"a": 2}]}, difficulty)
    assert split_difficulty(ranks, rank=1)[1] is None and split_difficulty(None, rank=0) == (None, None)


def test_a_resumed_online_run_goes_on_from_the_saved_scores(tmp_path):
    from tests.test_train_loop import TINY
    from trainer.config import build_config
    from trainer.loop import train

    def run_to(service: SyntheticService, steps: int, resume: str | None) -> dict:
        cfg = build_config("cpu_small", overrides={
            "model": dict(TINY), "augment": {"strong": False, "scale_min": 0.8},
            "data": {"source": "online", "generators": [service.endpoint], "captions_per_step": 8,
                     "draw_per_caption": 2, "connect_timeout": 10, "feedback_every": 2},
            "optim": {"lr": 1e-3}, "schedule": {"steps": steps, "warmup_steps": 1, "resume_lr": "replan"},
            "run": {"output": str(tmp_path / "run"), "save_every": 100, "log_every": 2, "progress": False,
                    "resume": resume}})
        train(cfg)
        state = json.loads((tmp_path / "run" / "checkpoints" / "last" / "source_state_0.json").read_text())
        return dict(zip(state[DIFFICULTY_KEY]["ids"], state[DIFFICULTY_KEY]["scores"]))

    board = feedback.FeedbackBoard(served=range(400), weight=1.0)
    with SyntheticService(num_captions=400, m=4, size=32, feedback=board) as service:
        first = run_to(service, 4, None)
        assert len(first) > 8 and all(math.isfinite(s) and s > 0 for s in first.values())
        second = run_to(service, 5, "auto")  # one more step: at most 8 captions' scores change
    assert set(first) <= set(second)
    unchanged = [c for c in first if second[c] == first[c]]
    assert len(unchanged) >= len(first) - 8
