"""Online source against a real GroupServer on 127.0.0.1 (real ZeroMQ sockets)."""
from __future__ import annotations

import pytest
import torch

from tests.polling import wait_for
from tests.train_helpers import SyntheticService, free_tcp_endpoint
from trainer.data.sources import build_source
from trainer.data.config import DataConfig, ReplayConfig
from trainer.data.sources.online import OnlineSource, choose_storage_device


def test_batches_stream_from_the_service():
    with SyntheticService(num_captions=40, m=4, size=24) as service:
        source = build_source("online", DataConfig(generators=[service.endpoint],
                                                   draw_per_caption=3, connect_timeout=5, sample_timeout=20),
                              ReplayConfig(capacity_groups=32), captions_per_rank=8)
        try:
            assert isinstance(source, OnlineSource)
            for _ in range(3):
                batch = source.next_batch()
                assert batch.images.shape == (8, 3, 24, 24, 3) and batch.images.dtype == torch.uint8
                assert len(set(batch.caption_ids.tolist())) == 8  # distinct captions per batch
                # images of one caption come from the same layout: closer to each other than to others
                g = batch.images.float().flatten(2)
                within = (g[:, 0] - g[:, 1]).abs().mean()
                across = (g[:, 0] - g.roll(1, dims=0)[:, 0]).abs().mean()
                assert within < across
            stats = source.stats()
            assert stats["groups_received"] >= 8 and stats["batches"] == 3 and stats["draws"] == 24
            for key in ("reuse_mean", "reuse_max", "staleness_mean_s", "stall_seconds", "fresh_fraction_last"):
                assert key in stats
            assert stats["capacity"] == 32 and stats["storage"] == "cpu"
        finally:
            source.close()


def test_buffer_sized_from_the_welcome_and_resized_by_flag():
    # the generator description's save_size and images_per_group size the buffer before any group
    with SyntheticService(num_captions=20, m=4, size=20) as service:
        source = OnlineSource(DataConfig(generators=[service.endpoint],
                                         draw_per_caption=2, connect_timeout=5, sample_timeout=20),
                              captions_per_rank=4)
        try:
            assert source.replay is not None
            assert (source.replay.height, source.replay.width, source.replay.images_per_group) == (20, 20, 4)
            assert source.next_batch().images.shape == (4, 2, 20, 20, 3)
        finally:
            source.close()
        resized = OnlineSource(DataConfig(generators=[service.endpoint],
                                          draw_per_caption=2, image_size=12, connect_timeout=5, sample_timeout=20),
                               ReplayConfig(capacity_gib=4 * 12 * 12 * 3 * 10 / 2**30), captions_per_rank=4)
        try:
            assert resized.next_batch().images.shape == (4, 2, 12, 12, 3)
            stats = resized.stats()
            assert stats["capacity"] == 10 and stats["groups_resized"] >= 4
        finally:
            resized.close()


def test_state_dict_restores_replay_counters():
    with SyntheticService(num_captions=20, m=3, size=16) as service:
        first = OnlineSource(DataConfig(generators=[service.endpoint], draw_per_caption=2, connect_timeout=5),
                             captions_per_rank=4)
        try:
            first.next_batch(), first.next_batch()
            state = first.state_dict()
        finally:
            first.close()
        second = OnlineSource(DataConfig(generators=[service.endpoint], draw_per_caption=2, connect_timeout=5),
                              captions_per_rank=4)
        try:
            second.load_state_dict(state)
            second.next_batch()
            assert second.stats()["batches"] == 3 and second.stats()["draws"] == 12
        finally:
            second.close()


def test_unreachable_generator_names_the_endpoint():
    endpoint = free_tcp_endpoint()
    with pytest.raises(ConnectionError, match=endpoint.replace(".", r"\.")):
        OnlineSource(DataConfig(generators=[endpoint], draw_per_caption=2, connect_timeout=0.5), captions_per_rank=4)


def test_too_few_images_per_group_is_refused():
    with SyntheticService(num_captions=8, m=2, size=16) as service:
        with pytest.raises(ValueError, match=r"serves 2 images per group, fewer than draw_per_caption=6"):
            OnlineSource(DataConfig(generators=[service.endpoint], draw_per_caption=6, connect_timeout=5),
                         captions_per_rank=4)


def test_storage_rule():
    assert choose_storage_device("auto", torch.device("cpu"), 10) == torch.device("cpu")
    assert choose_storage_device("host", torch.device("cpu"), 10) == torch.device("cpu")
    with pytest.raises(ValueError, match="needs a CUDA training device"):
        choose_storage_device("gpu", torch.device("cpu"), 10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_storage_rule_on_gpu():
    device = torch.device("cuda", 0)
    free, _ = torch.cuda.mem_get_info(device)
    assert choose_storage_device("auto", device, 1 << 20) == device
    assert choose_storage_device("auto", device, int(free)) == torch.device("cpu")
    assert choose_storage_device("host", device, 1 << 20) == torch.device("cpu")


def test_a_group_that_does_not_fit_is_skipped_and_the_stream_goes_on():
    from protocol.server import GroupServer
    from tests.train_helpers import generator_info, make_group

    # the welcome promises 4 images per group; the first group carries 2, the others 4
    with GroupServer("tcp://127.0.0.1:*", "liar", generator_info(4, 16), heartbeat_ms=200) as server:
        source = OnlineSource(DataConfig(generators=[server.endpoint],
                                         draw_per_caption=2, connect_timeout=5, sample_timeout=30, credits=1),
                              captions_per_rank=2)
        try:
            server.put(make_group(7, 2, 16), timeout=5)
            for caption_id in range(2):
                server.put(make_group(caption_id, 4, 16), timeout=5)
            batch = source.next_batch()
            assert sorted(batch.caption_ids.tolist()) == [0, 1]
            assert source.stats()["bad_groups"] == 1 and source.stats()["added"] == 2
        finally:
            source.close()
        assert server.stats().client_errors == 1  # the trainer's error about the group


def test_warns_once_when_most_groups_are_evicted_unseen(caplog):
    from trainer.data.sources.online import UNSEEN_WARNING_COUNT

    with SyntheticService(num_captions=64, m=2, size=8) as service:
        source = OnlineSource(DataConfig(generators=[service.endpoint],
                                         draw_per_caption=2, connect_timeout=5, sample_timeout=20),
                              ReplayConfig(capacity_groups=16), captions_per_rank=4)
        try:
            with caplog.at_level("WARNING", logger="trainer.data.sources.online"):
                source.next_batch()  # then no draws while the service keeps streaming: evictions pile up
                wait_for(lambda: source.stats()["evicted_unused"] >= UNSEEN_WARNING_COUNT + 64,
                         "evictions of never-drawn groups")
                wait_for(lambda: any("never drawn" in r.message for r in caplog.records), "the warning")
                source.next_batch()
        finally:
            source.close()
    warnings = [r.message for r in caplog.records if "never drawn" in r.message]
    assert len(warnings) == 1 and "--max-groups-per-s" in warnings[0] and "(4 per step)" in warnings[0]


def test_the_source_knows_which_service_served_each_caption_of_a_batch():
    with SyntheticService(num_captions=20, m=3, size=16) as service:
        source = OnlineSource(DataConfig(generators=[service.endpoint], draw_per_caption=2, connect_timeout=5),
                              captions_per_rank=4)
        try:
            ids = source.next_batch().caption_ids.tolist()
            routed, unknown = source.feedback.origins.route({c: 0.5 for c in ids})
            assert routed == {service.endpoint: {c: 0.5 for c in ids}} and unknown == 0
            source.send_feedback({c: 0.5 for c in ids})
            source.send_feedback(None)
            counts = source.stats()
            assert counts["feedback_entries"] + counts["feedback_waiting"] == len(ids)
            assert counts["feedback_unrouted"] == 0
        finally:
            source.close()
