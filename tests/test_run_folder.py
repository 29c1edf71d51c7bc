"""stablerep-train never overwrites a run and checks a resume before writing anything.

Every case goes through the real CLI (``trainer.cli.main`` in-process) with a tiny ViT on real
shards: a second run into the same ``--output`` is refused (exit 2) unless ``--resume`` or
``--overwrite``; a resume whose checkpoint differs in model, method, data layout or schedule is
refused naming the first difference, and the run folder stays byte for byte as it was; a changed
``--steps`` continues the lr from where the checkpoint left it (or replans it when asked).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_train_loop import SignalOnBatch
from tests.train_helpers import tiny_offline_args as tiny
from tests.train_helpers import write_shards
from trainer import cli
from trainer.loop import build_source, train
from trainer.schedule import lr_at


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), num_captions=32, m=4, size=32, groups_per_shard=16)


@pytest.fixture(scope="module")
def finished_run(shards, tmp_path_factory):
    """A completed 3-step run; tests copy it before touching it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(tiny(shards, out, 3)) == 0
    return out


@pytest.fixture
def run(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def summary(out: Path) -> dict:
    return json.loads((out / "train_summary.json").read_text())


def error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_a_second_run_into_a_run_folder_is_refused_and_changes_nothing(shards, run, capsys):
    before = hashes(run)
    assert cli.main(tiny(shards, run, 5)) == 2
    line = error_line(capsys)
    assert f"--output {run} already holds a run" in line and "--resume auto" in line and "--overwrite" in line
    assert "checkpoints/" in line and "train_summary.json" in line
    assert hashes(run) == before


def test_overwrite_replaces_the_old_run_and_keeps_other_files(shards, run, capsys):
    (run / "notes.txt").write_text("mine")
    assert summary(run)["steps"] == 3
    assert cli.main(tiny(shards, run, 2, "--overwrite")) == 0
    new = summary(run)
    assert new["steps"] == 2 and new["start_step"] == 0 and len(new["losses"]) == 2
    state = json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["total_steps"] == 2
    log = (run / "train.log").read_text()
    assert "completed at step 2/2" in log and "step 3/3" not in log  # the old run's log went with it
    assert (run / "notes.txt").read_text() == "mine"
    # the written config never carries the permission: feeding it back is refused again
    assert "overwrite: false" in (run / "config.yaml").read_text()
    capsys.readouterr()
    assert cli.main(["--config", str(run / "config.yaml")]) == 2
    assert "already holds a run" in error_line(capsys)


def test_overwrite_and_resume_of_the_same_run_are_refused_together(shards, run, capsys):
    before = hashes(run)
    assert cli.main(tiny(shards, run, 5, "--resume", "auto", "--overwrite")) == 2
    assert "--overwrite would delete the checkpoint" in error_line(capsys)
    assert hashes(run) == before


@pytest.mark.parametrize("flags, difference", [
    (["--model-kwargs", "depth=2"], "checkpoint has model.model_kwargs.depth = 1, this config 2"),
    (["--head-out", "8"], "checkpoint has model.head_out = 16, this config 8"),
    (["--method", "simclr"], "checkpoint has method.name = 'stablerep', this config 'simclr'"),
    (["--draw-per-caption", "4"], "checkpoint has data.draw_per_caption = 2, this config 4"),
    (["--warmup-steps", "2"], "checkpoint has warmup steps = 1, this config 2"),
    (["--lr", "0.5"], "checkpoint has peak lr = "),
])
def test_a_resume_that_does_not_fit_is_refused_before_anything_is_written(shards, run, capsys, flags, difference):
    before = hashes(run)
    assert cli.main(tiny(shards, run, 5, "--resume", "auto", *flags)) == 2
    line = error_line(capsys)
    assert difference in line, line
    assert f"--resume {run / 'checkpoints' / 'last'}" in line and "--config" in line
    assert hashes(run) == before  # config.yaml, checkpoint, backbone, log, summary: all untouched


def test_weights_that_do_not_fit_despite_equal_configs_are_one_line(shards, run, capsys):
    """A checkpoint whose saved config was edited to agree with the new flags still cannot load: the
    load_state_dict error becomes one line, exit 2, and the checkpoint and config.yaml stay."""
    state_file = run / "checkpoints" / "last" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["config"]["model"]["head_out"] = 8
    state_file.write_text(json.dumps(state))
    before = hashes(run)
    assert cli.main(tiny(shards, run, 3, "--resume", "auto", "--head-out", "8")) == 2
    line = error_line(capsys)
    assert "the checkpoint's weights do not fit this model" in line and "size mismatch" in line, line
    after = hashes(run)
    kept = [name for name in before if not name.startswith("train.log")]
    assert {name: after[name] for name in kept} == {name: before[name] for name in kept}


def test_a_missing_checkpoint_is_exit_2(shards, tmp_path, capsys):
    assert cli.main(tiny(shards, tmp_path / "new", 3, "--resume", str(tmp_path / "nothere"))) == 2
    assert "no checkpoint there" in error_line(capsys)
    assert not (tmp_path / "new").exists()


def test_resuming_another_runs_checkpoint_into_a_run_folder_is_refused(shards, run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    before = hashes(run)
    assert cli.main(tiny(shards, run, 5, "--resume", str(other))) == 2
    assert "continues another run" in error_line(capsys)
    assert hashes(run) == before


def test_longer_steps_on_a_finished_run_are_refused_unless_replanned(shards, run, capsys):
    before = hashes(run)
    assert cli.main(tiny(shards, run, 6, "--resume", "auto")) == 2
    line = error_line(capsys)
    assert "schedule has ended" in line and "--resume-lr replan" in line and "steps 4-6" in line
    assert hashes(run) == before
    assert cli.main(tiny(shards, run, 6, "--resume", "auto", "--resume-lr", "replan")) == 0
    resumed = summary(run)
    peak = 1e-3 * 8 * 2 / 256 / 2  # cpu_small's base lr by the official rule
    want = [lr_at(s, peak_lr=peak, total_steps=6, warmup_steps=1) for s in (3, 4, 5)]
    assert resumed["start_step"] == 3 and resumed["lrs"] == pytest.approx(want)
    assert "run length 3 -> 6 steps (--resume-lr replan)" in (run / "train.log").read_text()


def test_longer_steps_continue_the_lr_from_where_the_checkpoint_left_it(shards, tmp_path):
    out = tmp_path / "run"
    cfg, _ = cli.parse_config(tiny(shards, out, 8))
    source = build_source(cfg, device=torch.device("cpu"), rank=0, world_size=1, local_captions=8)
    try:
        first = train(cfg, source=SignalOnBatch(source, at=3))  # SIGTERM: checkpoint at step 2 or 3 of 8
    finally:
        source.close()
    # batch 3 is drawn ahead while step 2 runs: the run stops after the step during which the signal came
    stopped = first["steps"]
    assert first["interrupted"] and stopped in (2, 3)
    peak = cfg.peak_lr()
    reached = lr_at(stopped, peak_lr=peak, total_steps=8, warmup_steps=1)  # what the next step of the 8-step run would use

    assert cli.main(tiny(shards, out, 12, "--resume", "auto")) == 0
    resumed = summary(out)
    left = 12 - stopped
    want = [0.5 * reached * (1 + math.cos(math.pi * k / left)) for k in range(left)]  # new cosine over the steps left
    assert resumed["start_step"] == stopped and resumed["steps"] == 12 and resumed["lrs"] == pytest.approx(want)
    assert resumed["lrs"][0] == pytest.approx(reached)  # no jump
    saved = json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())["lr_schedule"]
    assert saved["from_step"] == stopped and saved["from_lr"] == pytest.approx(reached) and saved["total_steps"] == 12
    assert "run length 8 -> 12 steps: lr goes on from" in (out / "train.log").read_text()


def test_a_shorter_run_than_the_checkpoint_is_refused(shards, run, capsys):
    assert cli.main(tiny(shards, run, 2, "--resume", "auto")) == 2
    assert "past the new run length --steps 2" in error_line(capsys)


def test_model_without_model_kwargs_drops_the_presets_and_trains(shards, tmp_path, capsys):
    out = tmp_path / "cnn"
    argv = ["--preset", "cpu_small", "--model", "small_cnn", "--source", "offline", "--data", str(shards),
            "--output", str(out), "--img-size", "32", "--image-size", "32", "--head-hidden", "32", "--head-out", "16",
            "--captions-per-step", "8", "--draw-per-caption", "2", "--steps", "2", "--warmup-steps", "1",
            "--log-with", "--num-workers", "0", "--no-progress"]
    cfg, _ = cli.parse_config(argv)
    assert cfg.model.name == "small_cnn" and cfg.model.model_kwargs == {}
    note = capsys.readouterr().err
    assert "--model small_cnn: dropped model_kwargs" in note and "vit_tiny_patch16_224" in note
    assert cli.main(argv) == 0
    assert summary(out)["steps"] == 2
    # given together, --model-kwargs are kept; the same model as the preset's keeps the preset's map
    cfg, _ = cli.parse_config([*argv, "--model-kwargs", "width=8"])
    assert cfg.model.model_kwargs == {"width": 8}
    cfg, _ = cli.parse_config([*argv, "--model", "vit_tiny_patch16_224"])
    assert cfg.model.model_kwargs["embed_dim"] == 96


def _tars_without_manifest(shards: Path, out: Path) -> list[str]:
    """``--data`` of the same 32 groups as plain WebDataset tars (another caption-id namespace, as
    many samples)."""
    out.mkdir()
    for tar in shards.glob("shard-*.tar*"):
        shutil.copy(tar, out / tar.name)
    return ["--data", *sorted(str(tar) for tar in out.glob("shard-*.tar"))]


@pytest.mark.parametrize("other, flags, field_name", [
    ("more", [], "num_samples = 32"),
    (None, ["tars"], "data_fingerprint = "),
    (None, ["--seed", "7"], "seed = 0"),
])
def test_a_resume_on_other_data_or_seed_is_refused_naming_the_field(shards, run, tmp_path, capsys, other, flags,
                                                                    field_name):
    """Checked from the manifest and shard indexes before the model is built: exit 2, one line naming
    the field of the saved data state, the run folder byte for byte as it was."""
    data = write_shards(tmp_path / "more", num_captions=40, m=4, size=32, groups_per_shard=16) if other else shards
    if flags == ["tars"]:
        flags = _tars_without_manifest(shards, tmp_path / "tars")
    before = hashes(run)
    assert cli.main(tiny(data, run, 3, "--resume", "auto", *flags)) == 2
    line = error_line(capsys)
    assert f"its data state has {field_name}" in line and f"--resume {run / 'checkpoints' / 'last'}" in line, line
    assert hashes(run) == before
