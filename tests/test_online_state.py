"""An endless online run keeps its position on disk: a restart (even after kill -9) serves new groups."""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from generator_service.captions import load_captions
from generator_service.config import GeneratorConfig
from generator_service.online_state import STATE_FILE, OnlineState, OnlineStateError, RunIdentity
from generator_service.procedural import write_caption_file
from generator_service.service import ServiceOptions, group_id_for, work_items
from generator_service.shards import read_manifest
from protocol.client import GroupClient
from tests.train_helpers import free_tcp_endpoint

REPO = Path(__file__).resolve().parents[1]
IDENTITY = RunIdentity(fingerprint="abcdef0123456789", seed=0, images_per_group=2, captions_digest="d" * 16,
                       caption_count=5)


def _file(directory: Path) -> dict:
    return json.loads((directory / STATE_FILE).read_text())


def test_positions_are_leased_ahead_and_a_restart_continues_past_the_lease(tmp_path):
    state = OnlineState(tmp_path, IDENTITY, lease=4).open()
    assert state.restarts == 0 and state.start_position == 0
    taken = list(itertools.islice(state.positions(), 6))
    assert taken == [0, 1, 2, 3, 4, 5]
    # Before position 4 was handed out the file said 4; then the next lease: 8.
    assert _file(tmp_path)["next_position"] == 8
    # No close(): as after kill -9. The restart begins at the leased position, past every position handed out.
    again = OnlineState(tmp_path, IDENTITY, lease=4).open()
    assert again.restarts == 1 and again.start_position == 8
    assert next(again.positions()) == 8
    again.close()  # a clean stop writes the exact next position
    assert _file(tmp_path)["next_position"] == 9
    assert OnlineState(tmp_path, IDENTITY).open().start_position == 9


def test_a_state_of_another_run_is_refused_naming_the_field(tmp_path):
    OnlineState(tmp_path, IDENTITY).open().close()
    other = RunIdentity(**{**IDENTITY.__dict__, "seed": 3})
    with pytest.raises(OnlineStateError, match=r"online_state.json: this state belongs to another run: seed was 0, now 3"):
        OnlineState(tmp_path, other).open()


@pytest.mark.parametrize("content, field", [
    ("{not json", "cannot read the online state"),
    ("[" * 100000, "cannot read the online state (RecursionError"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"version": 9}), "version 9 is not 1"),
    (json.dumps({"version": 1, "next_position": -1, "restarts": 0, "run": {}}), "field 'next_position'"),
    (json.dumps({"version": 1, "next_position": 3, "restarts": True, "run": {}}), "field 'restarts'"),
    (json.dumps({"version": 1, "next_position": 3, "restarts": 0, "run": "x"}), "field 'run'"),
])
def test_a_corrupt_state_file_is_refused_with_file_and_field(tmp_path, content, field):
    (tmp_path / STATE_FILE).write_text(content)
    with pytest.raises(OnlineStateError) as info:
        OnlineState(tmp_path, IDENTITY).open()
    assert str(tmp_path / STATE_FILE) in str(info.value) and field in str(info.value)


def test_positions_walk_the_epochs_of_the_caption_set(tmp_path):
    captions = load_captions(write_caption_file(tmp_path / "captions.txt", 3))
    fp = GeneratorConfig(backend="procedural").fingerprint()
    from_positions = [item.group_id for item in work_items(captions, fp, 0, 2, None, positions=iter([4, 5, 6]))]
    assert from_positions == [group_id_for(fp, 1, 1), group_id_for(fp, 2, 1), group_id_for(fp, 0, 2)]
    plain = [item.group_id for item in itertools.islice(work_items(captions, fp, 0, 2, None), 7)]
    assert plain[4:] == from_positions


def test_state_flag_is_only_for_endless_online_runs(tmp_path):
    captions = load_captions(write_caption_file(tmp_path / "captions.txt", 3))
    config = GeneratorConfig(backend="procedural")
    with pytest.raises(ValueError, match="--state DIR applies to endless online runs"):
        ServiceOptions(config=config, captions=captions, devices=["cpu"], out=str(tmp_path / "o"), state=str(tmp_path / "s"))
    online = ServiceOptions(config=config, captions=captions, devices=["cpu"], bind="tcp://127.0.0.1:*",
                            archive=str(tmp_path / "a"))
    assert online.state_dir == str(tmp_path / "a")  # the archive keeps the position when --state is not given


class _Collector:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seeds: dict[str, list[int]] = {}

    def __call__(self, group) -> None:
        with self.lock:
            self.seeds[group.group_id] = list(group.seeds)

    def count(self) -> int:
        with self.lock:
            return len(self.seeds)


def _serve_until(command: list[str], at_least: int, timeout: float = 240.0) -> dict[str, list[int]]:
    """Start the service, collect at least ``at_least`` groups, then kill -9 it."""
    endpoint = free_tcp_endpoint()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([*command, "--bind", endpoint], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    collect = _Collector()
    client = GroupClient([endpoint], collect, client_name="restart-drill", credits=4,
                         connect_timeout=120.0)
    try:
        client.start()
        deadline = time.monotonic() + timeout
        while collect.count() < at_least:
            assert proc.poll() is None, f"service exited early: {proc.stderr.read()}"
            assert time.monotonic() < deadline, f"fewer than {at_least} groups after {timeout}s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        client.close()
    return collect.seeds


@pytest.mark.parametrize("where", ["--state", "--archive"])
def test_a_killed_online_service_restarts_without_serving_an_id_or_seed_again(tmp_path, where):
    captions = write_caption_file(tmp_path / "captions.txt", 6)
    directory = tmp_path / "run"
    command = [sys.executable, "-m", "generator_service.cli", "--backend", "procedural", "--gpus", "cpu:1",
               "--captions", str(captions), "--images-per-group", "2", "--save-size", "16", "--worker-batch", "2",
               "--no-progress", "--log-level", "WARNING", where, str(directory)]
    if where == "--archive":
        command += ["--shard-size", "2"]
    first = _serve_until(command, 8)  # more than one epoch of 6 captions
    archived_first = ({g for s in read_manifest(directory).shards for g in s.group_ids}
                      if where == "--archive" else set())
    second = _serve_until(command, 8)
    assert not set(first) & set(second), "a restart served a group id again"
    seeds_first = {s for seeds in first.values() for s in seeds}
    seeds_second = {s for seeds in second.values() for s in seeds}
    assert not seeds_first & seeds_second, "a restart rendered images with seeds already used"
    state = json.loads((directory / STATE_FILE).read_text())
    assert state["restarts"] == 1
    if where == "--archive":
        assert archived_first and not archived_first & set(second)  # archived groups are never served again


def test_every_group_served_before_a_kill_9_is_archived_once_the_service_restarts(tmp_path):
    """The open shard of a killed service is not lost: the restart recovers its complete groups, and
    every group a trainer received is in the archive (before, the open shard's groups were not)."""
    captions = write_caption_file(tmp_path / "captions.txt", 6)
    directory = tmp_path / "archive"
    command = [sys.executable, "-m", "generator_service.cli", "--backend", "procedural", "--gpus", "cpu:1",
               "--captions", str(captions), "--images-per-group", "2", "--save-size", "16", "--worker-batch", "2",
               "--no-progress", "--log-level", "WARNING", "--archive", str(directory), "--shard-size", "1000"]
    served = _serve_until(command, 8)
    _serve_until(command, 1)  # the restart's open() recovers the first run's open shard
    archived = [g for s in read_manifest(directory).shards for g in s.group_ids]
    assert set(served) <= set(archived) and len(archived) == len(set(archived))


def test_a_remote_archive_without_state_keeps_the_position_in_its_staging_folder(tmp_path, monkeypatch):
    """``--archive s3://...`` alone: the position lives in the archive's local staging folder (one per URL
    and endpoint), so a kill -9 and restart on this machine serves no id or seed again, and every group
    served before the kill ends up in the bucket once."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from generator_service.service import REMOTE_ARCHIVE_STATE
    from generator_service.shards import staging_dir
    from tests.s3_server import s3_server

    captions = write_caption_file(tmp_path / "captions.txt", 6)
    url = "s3://bucket/archive"
    with s3_server(monkeypatch):
        options = ServiceOptions(config=GeneratorConfig(backend="procedural"), captions=load_captions(captions),
                                 devices=["cpu"], bind="tcp://127.0.0.1:*", archive=url)
        assert options.state_dir == str(staging_dir(url) / REMOTE_ARCHIVE_STATE)
        command = [sys.executable, "-m", "generator_service.cli", "--backend", "procedural", "--gpus", "cpu:1",
                   "--captions", str(captions), "--images-per-group", "2", "--save-size", "16", "--worker-batch", "2",
                   "--no-progress", "--log-level", "WARNING", "--archive", url, "--shard-size", "1000"]
        first = _serve_until(command, 8)
        second = _serve_until(command, 8)  # its open() salvages and uploads the first run's open shard
        assert not set(first) & set(second), "a restart served a group id again"
        assert not {s for v in first.values() for s in v} & {s for v in second.values() for s in v}
        assert json.loads((Path(options.state_dir) / STATE_FILE).read_text())["restarts"] == 1
        archived = [g for s in read_manifest(url).shards for g in s.group_ids]
        assert set(first) <= set(archived) and len(archived) == len(set(archived))
