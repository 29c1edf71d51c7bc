"""stablerep-train end to end against a real local generator service (procedural backend, 127.0.0.1).

The service runs as ``python -m generator_service.cli`` in a subprocess; the trainer connects over
real ZeroMQ sockets. One run is killed with SIGKILL mid-training and resumed with ``--resume auto``.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.train_helpers import free_tcp_endpoint
from trainer import cli
from trainer.checkpoint import find_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    from generator_service.cli import main as generator_main

    captions = tmp_path_factory.mktemp("captions") / "captions.txt"
    assert generator_main(["captions", "--n", "96", "--out", str(captions)]) == 0
    endpoint = free_tcp_endpoint()
    log = open(tmp_path_factory.mktemp("gen") / "generator.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "generator_service.cli", "--captions", str(captions), "--backend", "procedural",
         "--bind", endpoint, "--height", "32", "--width", "32", "--save-size", "32", "--images-per-group", "4",
         "--gpus", "cpu", "--queue", "16", "--no-progress", "--status-every", "60", "--drain-timeout", "2"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def train_args(endpoint: str, output: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--preset", "cpu_small", "--generators", endpoint, "--output", str(output),
        "--img-size", "32", "--model-kwargs", "depth=2", "--head-hidden", "64", "--head-out", "32",
        "--captions-per-step", "16", "--draw-per-caption", "4", "--image-size", "32", "--replay-capacity", "64",
        "--weak-aug", "--scale-min", "0.8", "--lr", "2e-3", "--warmup-steps", "2", "--steps", str(steps),
        "--connect-timeout", "60", "--sample-timeout", "120", "--log-with", "--no-progress", "--seed", "3", *extra,
    ]


def read_summary(output: Path) -> dict:
    return json.loads((output / "train_summary.json").read_text())


def test_online_train_kill_and_resume(generator, tmp_path):
    out = tmp_path / "run"
    # 1. in-process: a short run against the live service; the loss falls
    assert cli.main(train_args(generator, out, 10)) == 0
    first = read_summary(out)
    losses = first["losses"]
    assert first["steps"] == 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    assert first["source_stats"]["groups_received"] >= 16 and first["source_stats"]["batches"] == 10

    # 2. a separate process resumes it (the finished 10-step schedule replanned for 200 steps),
    # checkpoints every 2 steps, and is killed with SIGKILL
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.cli", *train_args(generator, out, 200, "--resume", "auto", "--resume-lr", "replan",
                                                         "--save-every", "2")],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 240
    saved_step = 10
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            ckpt = find_checkpoint("auto", out)
            try:
                saved_step = json.loads((ckpt / "trainer_state.json").read_text())["step"] if ckpt else saved_step
            except (OSError, ValueError):
                pass  # mid-swap: look again
            if saved_step >= 14:
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"trainer exited early: {proc.stderr.read().decode()[-2000:]}"
        assert saved_step >= 14, "no checkpoint past step 14 before the deadline"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()

    # 3. resume after the kill: continues from the last complete checkpoint
    ckpt = find_checkpoint("auto", out)
    saved_step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert saved_step >= 14
    assert cli.main(train_args(generator, out, saved_step + 2, "--resume", "auto")) == 0
    resumed = read_summary(out)
    assert resumed["start_step"] == saved_step and resumed["steps"] == saved_step + 2
    assert len(resumed["losses"]) == 2 and all(math.isfinite(x) for x in resumed["losses"])
    assert resumed["images_seen"] == (saved_step + 2) * 64
    state = json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["step"] == saved_step + 2
    # the replay counters were carried over from the killed run's checkpoint
    assert resumed["source_stats"]["batches"] == saved_step + 2
    assert resumed["source_stats"]["groups_resized"] == 0  # served at 32 px, stored at 32 px
    assert (out / "backbone.safetensors").is_file() and (out / "config.yaml").is_file()


def test_unreachable_generator_fails_naming_the_endpoint(tmp_path, capsys):
    endpoint = free_tcp_endpoint()
    args = train_args(endpoint, tmp_path / "run", 2)
    args[args.index("--connect-timeout") + 1] = "0.5"
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert endpoint in err and "no generator reachable" in err
