"""Replay storage: the auto rule sized from the training estimate, and exact page-locking."""
from __future__ import annotations

import pytest
import torch

from trainer.config import build_config
from trainer.preflight import estimate_memory
from trainer.loop import meta_model
from trainer.data.replay import ReplayBuffer
from trainer.data.replay_storage import GPU_HEADROOM_FRACTION, PinnedHostStorage, choose_storage_device, gpu_storage_fits

GIB = 1 << 30


def paper_training_bytes(world_size: int) -> int:
    cfg = build_config("paper_vitb16_cc12m_1x", validate=False)
    return int(estimate_memory(cfg, meta_model(cfg), world_size).total_gib * GIB)


def test_auto_rule_leaves_the_training_step_its_memory():
    free, total = 78 * GIB, 80 * GIB  # one H100 at start, the model not yet on it
    buffer = 19 * GIB
    # the paper batch on 8 GPUs (1032 images each): the step alone needs more than the card
    training = paper_training_bytes(world_size=8)
    assert training > total
    assert buffer <= 0.25 * free  # what the former rule (a quarter of the free memory) put on the GPU
    assert not gpu_storage_fits(buffer, free=free, total=total, held=0, training_bytes=training)
    # on 32 GPUs (258 images each) the step leaves room: the buffer fits while it leaves the headroom
    training = paper_training_bytes(world_size=32)
    room = free - training - GPU_HEADROOM_FRACTION * total
    assert 0 < room < total
    assert gpu_storage_fits(int(room) - 1, free=free, total=total, held=0, training_bytes=training)
    assert not gpu_storage_fits(int(room) + GIB, free=free, total=total, held=0, training_bytes=training)
    # what this process's allocator already holds (its weights) counts as available to it
    assert gpu_storage_fits(int(room) + GIB, free=free - 2 * GIB, total=total, held=3 * GIB, training_bytes=training)


def test_bf16_halves_the_activation_estimate():
    fp32 = build_config("paper_vitb16_cc12m_1x", overrides={"run": {"precision": "no"}}, validate=False)
    bf16 = build_config("paper_vitb16_cc12m_1x", overrides={"run": {"precision": "bf16"}}, validate=False)
    a = estimate_memory(fp32, meta_model(fp32), 32)
    b = estimate_memory(bf16, meta_model(bf16), 32)
    assert b.activations_gib == pytest.approx(a.activations_gib / 2) and b.weights_gib == a.weights_gib


def test_storage_rule_without_cuda():
    assert choose_storage_device("auto", torch.device("cpu"), 10, training_bytes=GIB) == torch.device("cpu")
    with pytest.raises(ValueError, match="needs a CUDA training device"):
        choose_storage_device("gpu", torch.device("cpu"), 10)


def test_host_storage_has_the_exact_shape_and_is_writable():
    keeper = PinnedHostStorage((3, 2, 5, 7, 3))
    assert keeper.tensor.shape == (3, 2, 5, 7, 3) and keeper.tensor.dtype == torch.uint8
    assert keeper.pinned == torch.cuda.is_available()
    keeper.tensor.zero_()
    keeper.tensor[1] = 9
    assert int(keeper.tensor.sum(dtype=torch.int64)) == 9 * 2 * 5 * 7 * 3
    keeper.release()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_replay_storage_is_locked_exactly_not_through_the_rounding_host_allocator():
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    # 3 x 1 x 300 x 301 x 3 bytes: not a power of two; the caching allocator would take 1 MiB
    replay = ReplayBuffer(3, 1, 300, 301, device=torch.device("cpu"), pin_memory=True)
    assert replay.storage.is_pinned() and replay.storage.numel() == 3 * 300 * 301 * 3
    assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) == before
    source = torch.full((300, 301, 3), 7, dtype=torch.uint8).pin_memory()
    replay.storage[1].copy_(source.cuda().cpu())
    assert int(replay.storage[1].float().mean()) == 7
    replay.close()
