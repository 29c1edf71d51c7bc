"""Caption feedback end to end: a trainer's online source tells a real service (ZeroMQ on 127.0.0.1) how hard
the captions it served were; a service that takes no feedback refuses it once and gets no more."""
from __future__ import annotations

import logging

from protocol import feedback
from tests.polling import wait_for
from tests.train_helpers import SyntheticService
from trainer.data.config import DataConfig
from trainer.data.sources.online import OnlineSource


def online_source(service: SyntheticService) -> OnlineSource:
    return OnlineSource(DataConfig(generators=[service.endpoint], draw_per_caption=2, connect_timeout=5),
                        captions_per_rank=4)


def test_the_service_receives_the_scores_of_the_captions_it_served():
    board = feedback.FeedbackBoard(served=range(20), weight=1.0)
    with SyntheticService(num_captions=20, m=3, size=16, feedback=board) as service:
        source = online_source(service)
        try:
            ids = source.next_batch().caption_ids.tolist()
            scores = {c: 0.25 + c for c in ids}
            source.send_feedback(scores)
            assert wait_for(lambda: board.scores() == scores, "the service's board to hold the scores")
            stats = source.stats()
            assert stats["feedback_messages"] == 1 and stats["feedback_entries"] == len(ids)
        finally:
            source.close()


def test_a_service_that_takes_no_feedback_is_told_once(caplog):
    with SyntheticService(num_captions=20, m=3, size=16) as service:  # no board: the type is refused
        source = online_source(service)
        try:
            ids = source.next_batch().caption_ids.tolist()
            with caplog.at_level(logging.WARNING):
                source.send_feedback({c: 1.0 for c in ids})
                assert wait_for(lambda: source.client.stats().feedback_refused == 1, "the refusal")
                assert wait_for(lambda: source.send_feedback({c: 2.0 for c in ids}) or source.feedback.outbox.refused,
                                "the source to stop sending")  # at its pace: one message per heartbeat interval
                source.send_feedback({c: 3.0 for c in ids})
            refusals = [r for r in caplog.records if "takes no feedback" in r.getMessage()]
            assert len(refusals) == 2  # the client names the service once; the source stops sending once
            assert source.client.stats().feedback_sent == 1
        finally:
            source.close()


def test_a_training_run_reports_the_captions_it_trained_on_to_the_service(tmp_path):
    from tests.test_train_loop import TINY
    from trainer.config import build_config
    from trainer.loop import train

    board = feedback.FeedbackBoard(served=range(40), weight=1.0)
    with SyntheticService(num_captions=40, m=4, size=32, feedback=board) as service:
        cfg = build_config("cpu_small", overrides={
            "model": dict(TINY), "augment": {"strong": False, "scale_min": 0.8},
            "data": {"source": "online", "generators": [service.endpoint], "captions_per_step": 8,
                     "draw_per_caption": 2, "connect_timeout": 10, "feedback_every": 2},
            "optim": {"lr": 1e-3}, "schedule": {"steps": 4, "warmup_steps": 1},
            "run": {"output": str(tmp_path / "run"), "save_every": 100, "log_every": 2, "progress": False}})
        summary = train(cfg)
        assert summary["steps"] == 4
        stats = summary["source_stats"]
        assert stats["feedback_messages"] >= 1 and stats["feedback_entries"] >= 8  # at least the first report
        assert wait_for(lambda: board.scores(), "the service's board to hold scores")
        scores = board.scores()
        assert set(scores) <= set(range(40)) and all(s > 0 for s in scores.values())
