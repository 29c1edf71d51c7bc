"""ReplayBuffer: eviction policies, reuse limits, freshness, blocking, stats, storage."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from protocol import Group
from trainer.data import replay
from trainer.data.config import ReplayConfig
from trainer.data.replay import ReplayBuffer, ReplayBufferClosed
from tests.polling import wait_for

H = W = 4
P = 3


def make_group(caption_id: int, m: int = P, tag: int | None = None, size: int = H) -> Group:
    """Group whose image i is filled with the value ``(tag * 8 + i) % 256`` (tag defaults to caption_id)."""
    tag = caption_id if tag is None else tag
    images = np.stack([np.full((size, size, 3), (tag * 8 + i) % 256, dtype=np.uint8) for i in range(m)])
    return Group(group_id=f"g{tag}", caption_id=caption_id, caption=f"caption {caption_id}",
                 seeds=list(range(m)), images=images)


def held_ids(buffer: ReplayBuffer) -> list[str]:
    return [g["group_id"] for g in buffer.held_groups()]


def test_fifo_evicts_oldest_and_pixels_follow_their_group():
    buffer = ReplayBuffer(3, P, H, W, policy=ReplayConfig(evict="fifo"))
    for cid in range(5):
        buffer.add(make_group(cid))
    assert held_ids(buffer) == ["g2", "g3", "g4"]
    batch = buffer.sample(3, 2)
    assert batch.images.shape == (3, 2, H, W, 3) and batch.images.dtype == torch.uint8
    for g, cid in enumerate(batch.caption_ids.tolist()):
        values = batch.images[g, :, 0, 0, 0].tolist()
        assert len(set(values)) == 2  # two different images of the group (no replacement)
        assert all(v // 8 == cid and v % 8 < P for v in values)
        assert batch.captions[g] == f"caption {cid}"
    assert sorted(batch.caption_ids.tolist()) == [2, 3, 4]


def test_most_used_evicts_highest_draw_count_ties_oldest():
    buffer = ReplayBuffer(3, P, H, W, policy=ReplayConfig(evict="most-used"), seed=3)
    for cid in range(3):
        buffer.add(make_group(cid))
    first = set(buffer.sample(2, 1).caption_ids.tolist())  # two groups drawn once
    second = set(buffer.sample(1, 1).caption_ids.tolist())
    draws = {g["caption_id"]: g["draws"] for g in buffer.held_groups()}
    assert sum(draws.values()) == 3 and draws == {c: (c in first) + (c in second) for c in range(3)}
    most = max(draws.values())
    expected_victim = min(c for c, d in draws.items() if d == most)  # oldest among the most used
    buffer.add(make_group(3))
    assert f"g{expected_victim}" not in held_ids(buffer)
    assert len(held_ids(buffer)) == 3
    # Ties (all never drawn): the oldest goes.
    fresh = ReplayBuffer(2, P, H, W, policy=ReplayConfig(evict="most-used"))
    for cid in range(3):
        fresh.add(make_group(cid))
    assert held_ids(fresh) == ["g1", "g2"]


def test_a_registered_eviction_policy_is_used_by_the_buffer_and_allowed_by_the_config():
    from trainer.config import ConfigError, TrainConfig
    from trainer.data.replay_evict import EVICTION_POLICIES

    @EVICTION_POLICIES.register("newest")
    def evict_newest(order: np.ndarray, draws: np.ndarray) -> int:
        return int(np.argmax(order))

    try:
        buffer = ReplayBuffer(3, P, H, W, policy=ReplayConfig(evict="newest"))
        for cid in range(5):
            buffer.add(make_group(cid))
        assert held_ids(buffer) == ["g0", "g1", "g4"]  # g2, then g3, left as the newest held
        cfg = TrainConfig()
        cfg.data.generators, cfg.schedule.steps, cfg.replay.evict = ["tcp://127.0.0.1:5555"], 1, "newest"
        assert cfg.validate().replay.evict == "newest"
    finally:
        EVICTION_POLICIES.unregister("newest")
    with pytest.raises(ConfigError, match="replay.evict = 'newest': must be one of fifo, most-used"):
        cfg.validate()
    with pytest.raises(ValueError, match="unknown eviction policy 'newest'; choose one of: fifo, most-used"):
        ReplayBuffer(3, P, H, W, policy=ReplayConfig(evict="newest"))


def test_max_reuse_is_never_exceeded_and_spent_groups_go_first():
    buffer = ReplayBuffer(4, P, H, W, policy=ReplayConfig(max_reuse=2), seed=1)
    for cid in range(4):
        buffer.add(make_group(cid))
    for _ in range(4):  # 4 groups x 2 uses = 4 batches of 2
        buffer.sample(2, 1)
        assert max(g["draws"] for g in buffer.held_groups()) <= 2
    with pytest.raises(TimeoutError):
        buffer.sample(1, 1, timeout=0.05)
    assert buffer.stats()["reuse_max"] == 2

    # Spent groups are evicted before older unspent ones, even under fifo.
    for seed in range(20):
        buffer = ReplayBuffer(3, P, H, W, policy=ReplayConfig(max_reuse=1, evict="fifo"), seed=seed)
        for cid in range(3):
            buffer.add(make_group(cid))
        buffer.sample(2, 1)
        unspent = [g["group_id"] for g in buffer.held_groups() if g["draws"] == 0]
        if unspent != ["g2"]:  # a case where plain fifo would keep a different group
            break
    assert unspent != ["g2"]
    buffer.add(make_group(3))
    buffer.add(make_group(4))
    assert held_ids(buffer) == unspent + ["g3", "g4"]


def test_min_fresh_respected_over_many_batches():
    buffer = ReplayBuffer(16, P, H, W, policy=ReplayConfig(min_fresh=0.5), seed=7)
    drawn_before: set[int] = set()
    next_id = 0
    for _ in range(60):
        for _ in range(2):
            buffer.add(make_group(next_id))
            next_id += 1
        if next_id < 4:
            continue
        batch = buffer.sample(4, 2, timeout=1.0)
        ids = batch.caption_ids.tolist()
        fresh = sum(cid not in drawn_before for cid in ids)
        assert fresh >= 2
        assert batch.meta["fresh_fraction"] == pytest.approx(fresh / 4)
        drawn_before.update(ids)
    stats = buffer.stats()
    assert stats["fresh_fraction_cumulative"] >= 0.5
    # Without new groups the fresh quota cannot be met: the sampler waits, then times out.
    while any(g["draws"] == 0 for g in buffer.held_groups()):
        buffer.sample(1, 1)
    with pytest.raises(TimeoutError, match="never drawn"):
        buffer.sample(4, 2, timeout=0.05)


def test_distinct_caption_ids_per_batch():
    buffer = ReplayBuffer(12, P, H, W, seed=5)
    for tag in range(12):
        buffer.add(make_group(tag % 4, tag=tag))  # 3 groups for each of 4 captions
    for _ in range(50):
        ids = buffer.sample(4, 2).caption_ids.tolist()
        assert sorted(ids) == [0, 1, 2, 3]
    with pytest.raises(TimeoutError, match="4 captions"):
        buffer.sample(5, 1, timeout=0.05)




def test_blocking_sample_wakes_when_producer_adds():
    buffer = ReplayBuffer(8, P, H, W)
    buffer.add(make_group(0))
    batches = []
    sampler = threading.Thread(target=lambda: batches.append(buffer.sample(3, 2, timeout=60.0)))
    sampler.start()
    wait_for(lambda: buffer.stats()["samplers_waiting"] == 1)  # blocked: 1 group, 3 needed
    for cid in range(1, 4):
        buffer.add(make_group(cid))
    sampler.join(timeout=60)
    assert batches[0].num_groups == 3
    stats = buffer.stats()
    assert stats["samplers_waiting"] == 0 and stats["stall_seconds"] > 0


def test_timeout_and_close_errors():
    buffer = ReplayBuffer(4, P, H, W)
    with pytest.raises(TimeoutError, match="waited 0.1s for 2 groups"):
        buffer.sample(2, 1, timeout=0.1)

    errors: list[BaseException] = []

    def waiter():
        try:
            buffer.sample(2, 1)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion below
            errors.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    wait_for(lambda: buffer.stats()["samplers_waiting"] == 1)
    buffer.close()
    thread.join(timeout=5)
    assert not thread.is_alive() and isinstance(errors[0], ReplayBufferClosed)
    buffer.add(make_group(9))  # after close: refused and counted, never stored
    assert buffer.stats()["dropped"] == 1 and len(buffer) == 0


def test_stats_match_hand_computed_values(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(replay, "_clock", lambda: now[0])
    buffer = ReplayBuffer(2, P, H, W, policy=ReplayConfig(evict="fifo"))
    buffer.add(make_group(0))  # t=0
    now[0] = 1.0
    buffer.add(make_group(1))  # t=1
    now[0] = 3.0
    first = buffer.sample(2, 1)  # staleness 3, 2
    now[0] = 5.0
    second = buffer.sample(2, 1)  # staleness 5, 4
    buffer.add(make_group(2))  # evicts g0 (2 draws)
    stats = buffer.stats()
    assert first.meta == {"reuse_mean": 0.0, "fresh_fraction": 1.0}
    assert second.meta == {"reuse_mean": 1.0, "fresh_fraction": 0.0}
    assert stats["size"] == 2 and stats["capacity"] == 2
    assert stats["added"] == 3 and stats["evicted"] == 1 and stats["evicted_unused"] == 0
    assert stats["draws"] == 4 and stats["batches"] == 2
    assert stats["reuse_mean"] == pytest.approx((2 + 0 + 2) / 3)  # g1, g2 held; g0 evicted
    assert stats["reuse_max"] == 2
    assert stats["staleness_mean_s"] == pytest.approx((3 + 2 + 5 + 4) / 4)
    assert stats["staleness_max_s"] == pytest.approx(5.0)
    assert stats["fresh_fraction_last"] == 0.0
    assert stats["fresh_fraction_cumulative"] == pytest.approx(0.5)
    assert stats["stall_seconds"] == 0.0
    buffer.add(make_group(3))  # evicts g1 (2 draws)
    buffer.add(make_group(4))  # evicts g2 (never drawn)
    assert buffer.stats()["evicted_unused"] == 1


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_storage_preallocated_and_input_views_copied_once():
    buffer = ReplayBuffer(2, P, H, W)
    assert buffer.storage.shape == (2, P, H, W, 3)
    pointer = buffer.storage.data_ptr()
    # A read-only, non-contiguous view with extra images (as decoded from a network frame).
    frame = np.zeros((5, H, 2 * W, 3), dtype=np.uint8)
    frame[:, :, ::2] = np.arange(5, dtype=np.uint8)[:, None, None, None] + 100
    view = frame[:, :, ::2]
    view.setflags(write=False)
    assert not view.flags.c_contiguous
    group = Group(group_id="view", caption_id=7, caption="c", seeds=[0] * 5, images=view)
    for i in range(5):
        group.group_id = f"view{i}"  # distinct ids: a repeated id is ignored
        buffer.add(group)
        assert buffer.storage.data_ptr() == pointer
    slot_values = sorted(set(buffer.storage[:, :, 0, 0, 0].flatten().tolist()))
    assert slot_values == [100, 101, 102]  # only the first P images are kept


def test_bad_groups_raise_naming_the_group():
    buffer = ReplayBuffer(2, P, H, W)
    with pytest.raises(ValueError, match=r"group g1: .*\[2, 4, 4, 3\]"):
        buffer.add(make_group(1, m=2))
    with pytest.raises(ValueError, match=r"group g2: .*\[3, 5, 5, 3\]"):
        buffer.add(make_group(2, size=5))
    with pytest.raises(ValueError, match="draw_per_caption"):
        buffer.sample(1, P + 1)
    with pytest.raises(ValueError, match="capacity"):
        buffer.sample(3, 1)
    assert len(buffer) == 0


def test_state_dict_restores_counters_and_rng():
    def filled(seed: int) -> ReplayBuffer:
        buffer = ReplayBuffer(8, P, H, W, seed=seed)
        for cid in range(8):
            buffer.add(make_group(cid))
        return buffer

    a = filled(0)
    a.sample(3, 2)
    state = a.state_dict()
    expected = a.sample(3, 2)
    b = filled(123)
    b.sample(3, 2)
    b.load_state_dict(state)
    assert b.stats()["draws"] == 3
    # Same contents, same RNG -> same draw. (Draw counts differ but min_fresh is 0.)
    got = b.sample(3, 2)
    assert got.caption_ids.tolist() == expected.caption_ids.tolist()
    assert torch.equal(got.images, expected.images)


def test_capacity_for_bytes():
    assert ReplayBuffer.capacity_for_bytes(2**30, 10, 256, 256) == 2**30 // (10 * 256 * 256 * 3) == 546


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_gpu_and_pinned_storage(device):
    buffer = ReplayBuffer(4, P, H, W, device=device)
    assert buffer.storage.device.type == device
    assert buffer.storage.is_pinned() == (device == "cpu")
    for cid in range(4):
        view = make_group(cid).images[:, ::-1]  # negative strides, read-only
        view.setflags(write=False)
        buffer.add(Group(group_id=f"g{cid}", caption_id=cid, caption="c", seeds=[0] * P, images=view))
    batch = buffer.sample(4, 2)
    assert batch.images.device.type == device
    for g, cid in enumerate(batch.caption_ids.tolist()):
        assert all(v // 8 == cid for v in batch.images[g, :, 0, 0, 0].cpu().tolist())


def test_encoded_groups_are_decoded_into_their_slot():
    import io

    from PIL import Image

    def png(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.full((H, W, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    buffer = ReplayBuffer(2, P, H, W)
    group = Group(group_id="enc", caption_id=5, caption="c", seeds=[0] * P, encoded=[png(40 + i) for i in range(P)],
                  encoding="png", shape=(P, H, W, 3))
    buffer.add(group)
    batch = buffer.sample(1, P)
    assert sorted(batch.images[0, :, 0, 0, 0].tolist()) == [40, 41, 42]
    bad = Group(group_id="enc2", caption_id=6, caption="c", seeds=[0] * P, encoded=[b"junk"] * P, encoding="png",
                shape=(P, H, W, 3))
    with pytest.raises(ValueError, match="group enc2: encoded image 0 cannot be decoded"):
        buffer.add(bad)
    assert len(buffer) == 1  # the failed group left no half-written slot behind


def test_a_group_id_held_or_recently_held_is_ignored():
    buffer = ReplayBuffer(2, P, H, W, recent_ids=3)
    assert buffer.add(make_group(0)) and not buffer.add(make_group(0))  # held: ignored
    assert buffer.add(make_group(1)) and buffer.add(make_group(2))  # g0 evicted, still remembered
    assert not buffer.add(make_group(0))
    assert buffer.stats()["added"] == 3 and buffer.state_dict()["counters"]["repeats"] == 2
    buffer.add(make_group(3))
    buffer.add(make_group(4))  # memory of ids is bounded (3): g0 is forgotten and accepted again
    assert buffer.add(make_group(0))
    restored = ReplayBuffer(2, P, H, W)
    restored.load_state_dict(buffer.state_dict())  # the recent ids survive a checkpoint
    assert not restored.add(make_group(4)) and restored.add(make_group(9))
