"""Caption feedback to two real services (ZeroMQ on 127.0.0.1) of different generators, which number
different captions with the same ids: each service's board gets the scores of the captions it served,
under its own ids, and nothing of the other's."""
from __future__ import annotations

from protocol import feedback
from tests.polling import wait_for
from tests.train_helpers import SyntheticService, generator_config
from trainer.data.config import DataConfig
from trainer.data.sources.caption_ids import namespaced_caption_id
from trainer.data.sources.online import OnlineSource

M, SIZE = 2, 16


def test_services_of_different_generators_each_get_the_scores_of_their_own_captions():
    boards = [feedback.FeedbackBoard(served=range(12), weight=1.0), feedback.FeedbackBoard(served=range(30), weight=1.0)]
    generators = [generator_config(M, SIZE), generator_config(M, SIZE).replace(height=48, width=48)]
    assert generators[0].fingerprint() != generators[1].fingerprint()
    with SyntheticService(num_captions=12, m=M, size=SIZE, generator=generators[0], feedback=boards[0]) as first, \
            SyntheticService(num_captions=30, m=M, size=SIZE, generator=generators[1], feedback=boards[1]) as second:
        origin = {}  # batch caption id -> (which service, its own caption id)
        for which, service in enumerate((first, second)):
            for own in range(service.num_captions):
                origin[namespaced_caption_id(f"generator:{generators[which].fingerprint()}", own)] = (which, own)
        source = OnlineSource(DataConfig(generators=[first.endpoint, second.endpoint], draw_per_caption=2,
                                         connect_timeout=5), captions_per_rank=8)
        try:
            trained: set[int] = set()
            while {origin[c][0] for c in trained} != {0, 1}:  # batches until both services served some
                trained.update(source.next_batch().caption_ids.tolist())
            scores = {c: 0.5 + i for i, c in enumerate(sorted(trained))}
            source.send_feedback(scores)
            expected: list[dict[int, float]] = [{}, {}]
            for caption_id, score in scores.items():
                which, own = origin[caption_id]
                expected[which][own] = score
            assert wait_for(lambda: [b.scores() for b in boards] == expected, "each board to hold its own captions")
            stats = source.stats()
            assert stats["feedback_messages"] == 2 and stats["feedback_entries"] == len(scores)
            assert stats["feedback_unrouted"] == 0
        finally:
            source.close()
