"""stablerep-generator CLI: bad input, subcommands, and a service killed / stopped / resumed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

from generator_service.cli import main
from generator_service.config import GeneratorConfig
from generator_service.procedural import write_caption_file
from generator_service.shard_salvage import complete_keys
from generator_service.shards import MANIFEST_NAME, SHARD_PATTERN, ShardWriter, read_manifest, scan_shard
from protocol.shards import TEMP_PATTERN

REPO = Path(__file__).resolve().parents[1]
N_CAPTIONS = 40
M = 3


@pytest.fixture
def captions_file(tmp_path):
    return str(write_caption_file(tmp_path / "captions.txt", N_CAPTIONS))


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_gpus_spec(capsys, captions_file, tmp_path):
    err = _error(capsys, ["--captions", captions_file, "--out", str(tmp_path / "o"), "--gpus", "2-0"])
    assert "--gpus '2-0'" in err and "runs backwards" in err
    err = _error(capsys, ["--captions", captions_file, "--out", str(tmp_path / "o"), "--gpus", "cpu:x"])
    assert "cpu:N" in err


def test_missing_captions_file(capsys, tmp_path):
    missing = tmp_path / "nope.txt"
    err = _error(capsys, ["--captions", str(missing), "--out", str(tmp_path / "o"), "--gpus", "cpu"])
    assert "caption file not found" in err and str(missing) in err
    assert "--captions FILE is required" in _error(capsys, ["--out", str(tmp_path / "o"), "--gpus", "cpu"])


def test_fingerprint_mismatch(capsys, captions_file, tmp_path):
    out = tmp_path / "shards"
    other = GeneratorConfig(save_size=32)
    ShardWriter(out, other).open().close()
    err = _error(capsys, ["--captions", captions_file, "--out", str(out), "--gpus", "cpu"])
    assert str(out) in err and other.fingerprint() in err and "fingerprint" in err
    assert not list(out.glob("shard-*.tar"))


def test_bad_mode_combinations_and_config(capsys, captions_file, tmp_path):
    assert "nothing to do" in _error(capsys, ["--captions", captions_file, "--gpus", "cpu"])
    err = _error(capsys, ["--captions", captions_file, "--gpus", "cpu", "--archive", str(tmp_path / "a")])
    assert "--archive" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 3\nnot_a_flag: 1\n")
    err = _error(capsys, ["--config", str(bad), "--captions", captions_file, "--out", str(tmp_path / "o")])
    assert str(bad) in err and "not_a_flag" in err


def test_captions_and_probe_set_subcommands(tmp_path):
    captions = tmp_path / "c.txt"
    assert main(["captions", "--n", "7", "--out", str(captions), "--seed", "3"]) == 0
    assert len(captions.read_text().splitlines()) == 7
    probe = tmp_path / "probe"
    argv = ["probe-set", "--out", str(probe), "--train-per-class", "1", "--val-per-class", "1", "--size", "16"]
    assert main(argv) == 0
    assert sorted(p.name for p in probe.iterdir() if p.is_dir()) == ["train", "val"]
    assert len(list((probe / "train").rglob("*.png"))) >= 2


def _manifest_groups(out: Path) -> int:
    try:
        manifest = read_manifest(out)
    except Exception:  # mid-rename on a first write
        return 0
    return sum(s.groups for s in manifest.shards) if manifest else 0


def _complete_groups_on_disk(out: Path) -> int:
    """Groups in every renamed (so complete) shard, listed in the manifest or not."""
    return sum(scan_shard(p).groups for p in out.iterdir() if SHARD_PATTERN.match(p.name))


def _wait_for_groups(out: Path, at_least: int, proc: subprocess.Popen, timeout: float = 240.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        groups = _manifest_groups(out)
        if groups >= at_least:
            return groups
        assert proc.poll() is None, f"service exited early: {proc.communicate()}"
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"fewer than {at_least} groups in {out} after {timeout}s")


def test_kill_then_sigterm_then_resume_exactly_once(tmp_path, captions_file):
    out = tmp_path / "shards"
    config = tmp_path / "run.yaml"
    # Large procedural renders so that a run takes a few seconds; saved small.
    config.write_text(yaml.safe_dump({"height": 256, "width": 256, "save-size": 32, "images-per-group": M,
                                      "shard_size": 4, "gpus": "cpu:2"}))
    argv = ["--config", str(config), "--captions", captions_file, "--out", str(out), "--worker-batch", "2"]
    command = [sys.executable, "-m", "generator_service.cli", *argv, "--no-progress", "--log-level", "WARNING"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    # 1. SIGKILL the whole service once it has completed a shard.
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_groups(out, 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # A shard renamed just before the kill may be missing from the manifest; resume adopts it, and
    # recovers the complete groups of the open shard the kill left (generator_service.shard_salvage).
    after_kill = _complete_groups_on_disk(out) + sum(len(complete_keys(t)) for t in out.iterdir() if TEMP_PATTERN.match(t.name))
    assert 4 <= after_kill < N_CAPTIONS, "the service finished before it was killed"

    # 2. Resume, then SIGTERM: exit 130 (interrupted) with every finished group flushed to a listed shard.
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_groups(out, after_kill + 4, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["stopped_by_signal"] is True
    assert summary["skipped_already_done"] == after_kill
    after_term = _manifest_groups(out)
    assert after_term == after_kill + summary["groups_written"] and after_term < N_CAPTIONS
    assert not list(out.glob(".shard-*"))

    # 3. Resume in-process to the end (flags override the YAML file).
    preview = tmp_path / "preview.png"
    assert main([*argv, "--no-progress", "--preview", str(preview), "--preview-groups", "3"]) == 0
    manifest = read_manifest(out)
    listed = sorted(p.name for p in out.glob("shard-*.tar"))
    assert listed == sorted(s.name for s in manifest.shards)  # nothing torn, nothing unlisted
    caption_ids: list[int] = []
    for name in listed:
        with tarfile.open(out / name) as tar:
            names = tar.getnames()
            for member in names:
                if member.endswith(".json"):
                    header = json.loads(tar.extractfile(member).read())
                    caption_ids.append(header["caption_id"])
                    key = header["group_id"]
                    assert [f"{key}.{j}.png" in names for j in range(M)] == [True] * M
                    assert len(header["seeds"]) == M and header["shape"] == [M, 32, 32, 3]
    assert Counter(caption_ids) == Counter(range(N_CAPTIONS))  # every caption exactly once

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["generator"]["height"] == 256 and resolved["run"]["worker_batch"] == 2
    assert resolved["fingerprint"] == manifest.fingerprint
    with Image.open(preview) as grid:
        assert grid.height >= 3 * 32

    # 4. Another image count into the same directory is refused.
    assert main([*argv, "--images-per-group", str(M + 1)]) == 2
    assert (out / MANIFEST_NAME).exists()


def test_a_model_folder_that_is_not_a_pipeline_is_one_line_exit_2_before_any_worker(capsys, captions_file, tmp_path):
    not_a_pipeline = tmp_path / "empty_model"
    not_a_pipeline.mkdir()
    out = tmp_path / "shards"
    argv = ["--captions", captions_file, "--out", str(out), "--gpus", "cpu", "--backend", "diffusers",
            "--model", str(not_a_pipeline), "--dtype", "fp32", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(not_a_pipeline) in err and "model_index.json" in err
    assert not out.exists()  # refused before the service (and its workers) started


def test_a_missing_model_path_and_an_unknown_backend_are_one_line_exit_2(capsys, captions_file, tmp_path):
    out = tmp_path / "shards"
    base = ["--captions", captions_file, "--out", str(out), "--gpus", "cpu", "--no-progress"]
    assert main([*base, "--backend", "diffusers", "--model", str(tmp_path / "no_such_model")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such folder" in err and "no_such_model" in err
    assert main([*base, "--backend", "difusers"]) == 2
    err = capsys.readouterr().err
    assert "unknown backend 'difusers'" in err and "diffusers" in err and "Traceback" not in err
    assert not out.exists()


def test_captions_outside_the_procedural_grammar_are_one_line_exit_2_naming_the_line(capsys, tmp_path):
    captions = tmp_path / "captions.txt"
    huge = "a photo of a dog " * 60_000  # a 1 MB line: the message shows its start only
    captions.write_text("a red circle with dots on a dark background\n\n" + huge + "\na photo of a cat\n")
    out = tmp_path / "shards"
    argv = ["--captions", str(captions), "--out", str(out), "--gpus", "cpu", "--images-per-group", "2", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and len(err) < 1000, err[:2000]
    assert f"{captions} line 3: 'a photo of a dog" in err and f"({len(huge.strip())} characters)" in err
    assert "--backend diffusers" in err and "stablerep-generator captions" in err
    assert not out.exists()  # refused before any worker started or any shard was opened

    captions.write_text("a red circle with dots on a dark background\na red dog with dots on a dark background\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "unknown shape 'dog'" in err


def test_a_caption_a_worker_cannot_generate_fails_the_run_and_keeps_what_was_made(tmp_path):
    """Past the preflight (here: the service called directly), a caption that fails in the worker
    stops the run after its retries, naming it, and the groups made before it are kept."""
    from generator_service.captions import load_captions
    from generator_service.pool import PoolError
    from generator_service.service import ServiceOptions, run_service

    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle with dots on a dark background\nthis is not a procedural caption\n")
    out = tmp_path / "shards"
    options = ServiceOptions(config=GeneratorConfig(images_per_group=2), captions=load_captions(captions),
                             devices=["cpu"], worker_batch=1, out=str(out))
    with pytest.raises(PoolError) as failure:
        run_service(options)
    assert "caption 1 ('this is not a procedural caption') failed to generate 2 times" in str(failure.value)
    assert "does not follow the procedural grammar" in str(failure.value)
    assert [c for s in read_manifest(out).shards for c in s.caption_ids] == [0]


def test_a_binary_caption_file_is_one_line_naming_file_and_line(capsys, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_bytes(b"a red circle with dots on a dark background\n\x89PNG\r\n\x1a\n\x00\xff")
    err = _error(capsys, ["--captions", str(captions), "--out", str(tmp_path / "o"), "--gpus", "cpu"])
    assert len(err.splitlines()) == 1 and f"{captions}:2: not UTF-8 text (byte 0x89 at column 1)" in err


def test_a_port_in_use_and_a_malformed_bind_are_one_line_exit_2(capsys, captions_file):
    import zmq

    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as taken:
        port = taken.bind_to_random_port("tcp://127.0.0.1")
        err = _error(capsys, ["--captions", captions_file, "--bind", f"tcp://127.0.0.1:{port}", "--gpus", "cpu"])
        assert len(err.splitlines()) == 1 and f"cannot bind 'tcp://127.0.0.1:{port}'" in err
    err = _error(capsys, ["--captions", captions_file, "--bind", "tcp://127.0.0.1:abc", "--gpus", "cpu"])
    assert err.strip() == ("stablerep-generator: error: --bind tcp://127.0.0.1:abc: port 'abc' is not a number "
                           "in 0-65535 (or * for any free port)")
    assert "no port" in _error(capsys, ["--captions", captions_file, "--bind", "tcp://127.0.0.1", "--gpus", "cpu"])


def test_max_groups_stops_after_that_many(capsys, captions_file, tmp_path):
    out = tmp_path / "shards"
    argv = ["--captions", captions_file, "--out", str(out), "--gpus", "cpu", "--max-groups", "5",
            "--images-per-group", "2", "--shard-size", "2", "--format", "jpg", "--quality", "80", "--no-progress"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["groups"] == 5 and summary["images"] == 10
    manifest = read_manifest(out)
    assert [c for s in manifest.shards for c in s.caption_ids] == [0, 1, 2, 3, 4]
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert any(name.endswith(".1.jpg") for name in tar.getnames())


def test_old_count_flags_are_deprecated_aliases(capsys, tmp_path):
    from generator_service.cli_arguments import parse_args

    args = parse_args(["--captions", "c.txt", "--batch-captions", "3", "--images-per-caption", "5"])
    assert (args.worker_batch, args.images_per_group) == (3, 5)
    err = capsys.readouterr().err
    assert "--batch-captions is deprecated; use --worker-batch" in err
    assert "--images-per-caption is deprecated; use --images-per-group" in err
    old = tmp_path / "old.yaml"
    old.write_text("batch-captions: 4\n")
    assert parse_args(["--config", str(old)]).worker_batch == 4
    assert "'batch-captions' is deprecated; use 'worker_batch'" in capsys.readouterr().err


def test_a_service_with_groups_and_no_client_says_it_waits_for_one(tmp_path, captions_file):
    from tests.polling import wait_for
    from tests.train_helpers import free_tcp_endpoint

    endpoint, log_path = free_tcp_endpoint(), tmp_path / "generator.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "generator_service.cli", "--captions", captions_file,
                                 "--bind", endpoint, "--gpus", "cpu", "--max-groups", "8", "--images-per-group", "2",
                                 "--save-size", "16", "--no-progress", "--drain-timeout", "2"],
                                cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "waiting for a client" in log_path.read_text() or proc.poll() is not None,
                     "the waiting-for-a-client line", timeout=120)
            assert proc.poll() is None, log_path.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 130
        finally:
            proc.kill()
    text = log_path.read_text()
    line = next(line for line in text.splitlines() if "waiting for a client" in line)
    assert f"ready at {endpoint} and no trainer connected" in line and f"--generators {endpoint}" in line
    assert text.count("waiting for a client") == 1  # said once, not every tick
    assert "at most 50 groups/s by default" in text  # the procedural online default throttle, announced


def test_the_procedural_backend_serving_online_is_throttled_by_default():
    from generator_service.backends.procedural import PROCEDURAL_ONLINE_GROUPS_PER_S
    from generator_service.cli_run import online_throttle

    assert online_throttle("procedural", serving_only=True, given=None) == PROCEDURAL_ONLINE_GROUPS_PER_S
    assert online_throttle("procedural", serving_only=True, given=0) is None  # 0 lifts it
    assert online_throttle("procedural", serving_only=True, given=7.5) == 7.5
    assert online_throttle("procedural", serving_only=False, given=None) is None  # shards: as fast as it goes
    assert online_throttle("diffusers", serving_only=True, given=None) is None
