"""The training loop on CPU with a tiny ViT: offline shards, loss falls, NaN stop, checkpoints, resume."""
from __future__ import annotations

import json
import math
import os
import signal

import pytest
import timm
import torch
from safetensors.torch import load_file

from tests.train_helpers import write_shards
from trainer.checkpoint import find_checkpoint
from trainer.config import build_config
from trainer.loop import NonFiniteLossError, build_source, train

TINY = {"img_size": 32, "model_kwargs": {"patch_size": 8, "depth": 2}, "head_hidden": 64, "head_out": 32}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), num_captions=48, m=4, size=32, groups_per_shard=12)


def tiny_config(shards, output, **groups):
    overrides = {
        "model": dict(TINY),
        "augment": {"strong": False, "scale_min": 0.8},
        "data": {"source": "offline", "data": [str(shards)], "captions_per_step": 16, "draw_per_caption": 4,
                 "num_workers": 0},
        "optim": {"lr": 2e-3},
        "schedule": {"steps": 10, "warmup_steps": 2},
        "run": {"output": str(output), "save_every": 100, "log_every": 2, "progress": False, "seed": 1},
    }
    for group, values in groups.items():
        overrides.setdefault(group, {}).update(values)
    return build_config("cpu_small", overrides=overrides)


def test_offline_training_runs_and_loss_falls(shards, tmp_path):
    out = tmp_path / "run"
    summary = train(tiny_config(shards, out))
    losses = summary["losses"]
    assert summary["steps"] == 10 and len(losses) == 10 and summary["images_seen"] == 10 * 64
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert summary["images_per_s"] > 0 and summary["stopped"] == "completed"

    # run directory: resolved config, checkpoint, tensorboard events, exported backbone
    assert (out / "config.yaml").is_file()
    state = json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 10 and state["images_seen"] == 640 and state["config"]["optim"]["lr"] == 2e-3
    assert list(out.glob("stablerep/**/events.out.tfevents.*")), "no tensorboard events written"
    meta = json.loads((out / "backbone.json").read_text())
    backbone = timm.create_model(meta["model"], pretrained=False, **meta["model_kwargs"])
    backbone.load_state_dict(load_file(str(out / "backbone.safetensors")))
    assert meta["num_features"] == backbone.num_features == 96  # cpu_small's width
    assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, 96)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    # a learning rate of 1e30 is a real bad input: the first update blows the weights up
    cfg = tiny_config(shards, out, optim={"lr": 1e30}, schedule={"steps": 6, "warmup_steps": 0}, run={"save_every": 1})
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    assert err.value.step == 2 and "at step 2" in str(err.value)
    assert str(out / "checkpoints" / "last") in str(err.value)
    state = json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 1 and math.isfinite(state["loss"])  # the step-2 failure did not overwrite it
    saved = load_file(str(out / "checkpoints" / "last" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_resume_continues_from_saved_step_with_optimizer_state(shards, tmp_path):
    out = tmp_path / "run"
    first = train(tiny_config(shards, out, schedule={"steps": 3, "warmup_steps": 1}))
    assert first["steps"] == 3
    saved_optimizer = torch.load(out / "checkpoints" / "last" / "optimizer.bin", weights_only=False)
    saved_model = load_file(str(out / "checkpoints" / "last" / "model.safetensors"))

    second = train(tiny_config(shards, out, schedule={"steps": 5, "warmup_steps": 1, "resume_lr": "replan"},
                               run={"resume": "auto"}))
    assert second["start_step"] == 3 and second["steps"] == 5 and len(second["losses"]) == 2
    assert second["images_seen"] == 5 * 64
    optimizer = torch.load(out / "checkpoints" / "last" / "optimizer.bin", weights_only=False)
    # AdamW's per-parameter step counters continued from the saved 3 (a fresh optimizer would say 2)
    steps = {float(s["step"]) for s in optimizer["state"].values()}
    assert {float(s["step"]) for s in saved_optimizer["state"].values()} == {3.0} and steps == {5.0}
    model = load_file(str(out / "checkpoints" / "last" / "model.safetensors"))
    assert any(not torch.equal(model[k], saved_model[k]) for k in saved_model)  # it trained on
    state = json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 5


class SignalOnBatch:
    """Delegates to a real source; sends this process SIGTERM when batch ``at`` is drawn."""

    def __init__(self, source, at: int) -> None:
        self.source, self.at, self.drawn = source, at, 0

    def next_batch(self):
        self.drawn += 1
        if self.drawn == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.source.next_batch()

    def __getattr__(self, name):
        return getattr(self.source, name)


def test_sigterm_finishes_the_step_checkpoints_and_returns(shards, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(shards, out, schedule={"steps": 50, "warmup_steps": 1})
    source = build_source(cfg, device=torch.device("cpu"), rank=0, world_size=1, local_captions=16)
    try:
        summary = train(cfg, source=SignalOnBatch(source, at=3))
    finally:
        source.close()
    # batch 3 is drawn ahead while step 2 runs: the run stops after the step during which the signal came
    assert summary["stopped"] == "interrupted (SIGTERM)" and summary["interrupted"] and summary["steps"] in (2, 3)
    state = json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["step"] == summary["steps"]
    # the batch drawn ahead but never trained on is not counted in the saved source state
    assert state["source_state"]["counters"]["batches"] == summary["steps"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def test_resume_paths(tmp_path):
    assert find_checkpoint(None, tmp_path) is None
    assert find_checkpoint("auto", tmp_path) is None  # nothing saved yet: start fresh
    with pytest.raises(FileNotFoundError, match="no checkpoint there"):
        find_checkpoint(str(tmp_path / "nope"), tmp_path)
    # a kill between the two renames of a checkpoint swap leaves only .last.prev: resume from it
    prev = tmp_path / "checkpoints" / ".last.prev"
    prev.mkdir(parents=True)
    (prev / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints" / ".last.tmp").mkdir()  # a torn write is never used
    assert find_checkpoint("auto", tmp_path) == prev
    assert find_checkpoint(str(tmp_path), tmp_path / "elsewhere") == prev  # a run directory as --resume


def test_two_runs_in_one_process_at_two_precisions(shards, tmp_path):
    """Accelerate keeps process-wide state: a second run at another precision must start from a fresh one."""
    from accelerate.state import AcceleratorState

    first = train(tiny_config(shards, tmp_path / "no", run={"precision": "no"}, schedule={"steps": 2, "warmup_steps": 1}))
    assert AcceleratorState().mixed_precision == "no"
    second = train(tiny_config(shards, tmp_path / "bf16", run={"precision": "bf16"},
                               schedule={"steps": 2, "warmup_steps": 1}))
    assert first["steps"] == second["steps"] == 2
    assert AcceleratorState().mixed_precision == "bf16"  # the second run really trained in bf16
    assert all(math.isfinite(x) for x in first["losses"] + second["losses"])


def test_collective_timeout_covers_the_first_fill():
    from trainer.launch import MIN_COLLECTIVE_TIMEOUT_S, collective_timeout_s

    assert collective_timeout_s(30, 60) == MIN_COLLECTIVE_TIMEOUT_S  # never below torch's NCCL default
    assert collective_timeout_s(30, 1800) > 30 + 1800  # a long first fill raises it past the wait


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_compiled_training_on_gpu(shards, tmp_path):
    out = tmp_path / "run"
    summary = train(tiny_config(shards, out, run={"precision": "bf16", "compile": True},
                                schedule={"steps": 4, "warmup_steps": 1}))
    assert summary["device"].startswith("cuda") and summary["steps"] == 4
    assert all(math.isfinite(x) for x in summary["losses"])
    assert (out / "checkpoints" / "last" / "trainer_state.json").is_file()
