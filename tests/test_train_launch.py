"""stablerep-train as a user starts it: torchrun with 2 CPU ranks, plain status lines to a pipe,
SIGINT -> exit 130 with a checkpoint, and the refusals (CPU guard, empty data, accelerate's
single-process CPU launcher). Every run is a real subprocess training a tiny ViT on real shards.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train_helpers import tiny_offline_args as tiny
from tests.train_helpers import write_shards
from trainer import cli
from trainer.checkpoint import find_checkpoint

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), num_captions=32, m=4, size=32, groups_per_shard=16)


def env() -> dict[str, str]:
    out = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        out.pop(name, None)
    return out


def launcher(name: str) -> list[str]:
    exe = BIN / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", {"torchrun": "torch.distributed.run"}[name]]


def test_torchrun_two_cpu_ranks_share_one_group_and_one_run_directory(shards, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [*launcher("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "trainer.cli",
         *tiny(shards, out, 3)],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    banner = [line for line in proc.stdout.splitlines() if "stablerep-train: device" in line]
    assert len(banner) == 1, proc.stdout  # only rank 0 prints
    assert "world size 2, rank 0" in banner[0] and "(gloo)" in banner[0]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3 and summary["stopped"] == "completed"
    log = (out / "train.log").read_text()
    assert log.count("world size 2") == 1 and "completed at step 3/3" in log
    assert find_checkpoint("auto", out) is not None and (out / "curve.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # one run directory

    # The 2-rank run resumes on 1 rank: it continues the global sample stream after the 3 x 8 groups
    # both ranks read (not from the epoch's start), and its checkpoint says so.
    proc = subprocess.run([str(BIN / "stablerep-train"), *tiny(shards, out, 5, "--resume", "auto", "--resume-lr", "replan")],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "restarts" not in proc.stdout + proc.stderr
    state = json.loads((out / "checkpoints" / "last" / "source_state_0.json").read_text())
    assert state["basis"] == {"start": 24, "skip": [], "world_size": 1} and state["consumed"] == 2 * 8
    assert not (out / "checkpoints" / "last" / "source_state_1.json").exists()


def test_accelerate_cpu_launcher_with_several_processes_is_refused(shards, tmp_path):
    proc = subprocess.run(
        [str(BIN / "accelerate"), "launch", "--num_processes", "2", "--cpu", "-m", "trainer.cli",
         *tiny(shards, tmp_path / "run", 2)],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode != 0
    assert "accelerate launch started a single process" in proc.stderr and "torchrun --nproc_per_node" in proc.stderr
    assert not (tmp_path / "run" / "train_summary.json").exists()


def test_plain_status_lines_reach_a_pipe_while_training_and_sigint_exits_130_with_a_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.cli", *tiny(shards, out, 100000, "--status-every", "0.01",
                                                     "--save-every", "100000")],
        cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        status_lines = []
        for line in proc.stdout:  # blocks until the trainer writes; no timing involved
            if " | loss " in line:
                status_lines.append(line)
                if len(status_lines) == 3:
                    break
        assert proc.poll() is None, "training should still be running while status lines arrive"
        assert all("/100000 " in line and "img/s" in line and "ETA" in line for line in status_lines)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == cli.EXIT_INTERRUPTED, err
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["interrupted"] and summary["stopped"] == "interrupted (SIGINT)"
    assert find_checkpoint("auto", out) is not None and summary["checkpoint"].endswith("last")
    log = (out / "train.log").read_text()
    assert status_lines[0].split(" ", 2)[2] in log and "interrupted (SIGINT)" in log


def test_paper_scale_on_cpu_stops_at_once_pointing_to_the_small_presets(shards, tmp_path, capsys):
    code = cli.main(["--preset", "paper_vitb16_cc12m_1x", "--source", "offline", "--data", str(shards),
                     "--dataset-captions", "10000000",  # the paper's epoch (the 32 shard groups hold no full step)
                     "--draw-per-caption", "4",  # the shards hold 4 images per group (the preset draws 6)
                     "--output", str(tmp_path / "run"), "--cpu", "--log-with"])
    err = capsys.readouterr().err
    assert code == 2
    assert "paper-scale settings on a CPU" in err and "--preset cpu_small" in err and "--force" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_empty_data_folder_is_reported_before_schedule_checks(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = cli.main(["--preset", "cpu_small", "--source", "offline", "--data", str(empty), "--steps", "5",
                     "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "data.data" in err and "no shard files" in err and "warmup" not in err
    code = cli.main(["--preset", "cpu_small", "--source", "offline", "--data", str(tmp_path / "missing"),
                     "--output", str(tmp_path / "run")])
    assert code == 2 and "no such file or directory" in capsys.readouterr().err


def test_print_config_of_a_preset_needs_no_endpoint(capsys):
    assert cli.main(["--preset", "cpu_small", "--print-config"]) == 0
    captured = capsys.readouterr()
    assert "depth: 4" in captured.out and "not runnable as is" in captured.err


def test_short_groups_and_mixed_shard_sets_are_refused_before_the_run_starts(shards, tmp_path, capsys):
    run = tmp_path / "run"
    code = cli.main([*tiny(shards, run, 2), "--draw-per-caption", "5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "stores 4 image(s) per group, fewer than draw_per_caption = 5" in err[0]
    small = write_shards(tmp_path / "small", num_captions=8, m=4, size=16, groups_per_shard=8)
    code = cli.main([*tiny(shards, run, 2), "--data", str(shards), str(small)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{shards} has image size 32, {small} has 16" in err[0]
    assert "--allow-mixed-data" in err[0] and not run.exists()  # nothing written
