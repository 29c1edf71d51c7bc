"""A trainer's feedback steers an online service's caption policy, over real sockets, and a restart
with ``--state`` keeps the scores (even after kill -9). Shares are counted over groups served, never timed."""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import zmq

from generator_service.caption_policy import CaptionPolicyConfig
from generator_service.captions import load_captions
from generator_service.config import GeneratorConfig
from generator_service.online_state import STATE_FILE
from generator_service.pool import StopSignal
from generator_service.procedural import write_caption_file
from generator_service.service import ServiceOptions, run_service
from protocol import Credit, Feedback, Group, Hello, Welcome
from tests.polling import wait_for
from tests.test_generator_online import RawClient
from tests.train_helpers import free_tcp_endpoint

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = 20
HARD_ID = 7
#: groups drawn before the feedback was taken (queue, worker tasks) are not counted
SKIP = 40
COUNTED = 200


def _mark(client: RawClient, hard_id: int = HARD_ID) -> None:
    ids = list(range(CAPTIONS))
    client.send(Feedback(ids, [100.0 if c == hard_id else 1.0 for c in ids]))


def _serve(client: RawClient, count: int) -> list[Group]:
    """``count`` groups, granting credit as they come and acknowledging them."""
    groups: list[Group] = []
    client.send(Credit(8))
    while len(groups) < count:
        group = client.receive(60.0, want=(Group,))
        assert group is not None, f"no group after {len(groups)}"
        groups.append(group)
        if len(groups) % 4 == 0:
            client.send(Credit(4, ack=group.group_id))
    return groups


def _share(groups: list[Group], caption_id: int = HARD_ID) -> float:
    return collections.Counter(g.caption_id for g in groups)[caption_id] / len(groups)


def test_the_hard_policy_serves_at_least_5x_more_of_a_caption_a_trainer_marks_100x(tmp_path):
    captions = load_captions(write_caption_file(tmp_path / "captions.txt", CAPTIONS))
    config = GeneratorConfig(backend="procedural", images_per_group=1, save_size=16)
    options = ServiceOptions(config=config, captions=captions, devices=["cpu"], worker_batch=2,
                             bind="tcp://127.0.0.1:*", queue=4, caption_policy=CaptionPolicyConfig("hard"),
                             state=str(tmp_path / "state"))
    stop = StopSignal()
    started: dict = {}
    live: dict = {}
    thread = threading.Thread(target=run_service, args=(options,), daemon=True,
                              kwargs={"stop": stop, "on_start": started.update,
                                      "on_tick": lambda pool, server: live.update(server=server)})
    thread.start()
    context = zmq.Context()
    try:
        wait_for(lambda: "endpoint" in started and "server" in live, "the service to start")
        client = RawClient(context, started["endpoint"])
        client.send(Hello(client="marker"))
        assert isinstance(client.receive(30.0, want=(Welcome,)), Welcome)
        _mark(client)
        wait_for(lambda: live["server"].stats().feedback_merged == 1, "the feedback merged")
        groups = _serve(client, SKIP + COUNTED)
        ids = [g.group_id for g in groups]
        assert len(set(ids)) == len(ids)  # each group its own id
        assert len({s for g in groups for s in g.seeds}) == len(groups)  # and fresh seeds
        share = _share(groups[SKIP:])
        assert share >= 5 / CAPTIONS, share
        assert {g.generator for g in groups} == {config.fingerprint()}
    finally:
        stop.request()
        stop.request()
        thread.join(timeout=120)
        context.destroy(linger=0)
    assert not thread.is_alive()
    saved = json.loads((tmp_path / "state" / STATE_FILE).read_text())["policy"]
    assert saved["policy"] == "hard" and [HARD_ID, 100.0] in saved["scores"]


def _start(command: list[str], endpoint: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([*command, "--bind", endpoint], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_a_service_killed_9_keeps_its_scores_through_the_state_file(tmp_path):
    """Marked, the service writes the scores to its state file (at most 10 s later, or at its next
    lease); killed with SIGKILL and started again, it serves the marked caption as often, with no
    feedback sent to it, and serves no group id again."""
    captions = write_caption_file(tmp_path / "captions.txt", CAPTIONS)
    directory = tmp_path / "state"
    command = [sys.executable, "-m", "generator_service.cli", "--backend", "procedural", "--gpus", "cpu:1",
               "--captions", str(captions), "--images-per-group", "1", "--save-size", "16", "--worker-batch", "2",
               "--queue", "4", "--max-groups-per-s", "0", "--no-progress", "--log-level", "WARNING", "--caption-policy", "hard",
               "--state", str(directory)]
    context = zmq.Context()
    procs = []
    try:
        endpoint = free_tcp_endpoint()
        procs.append(_start(command, endpoint))
        client = RawClient(context, endpoint)
        client.send(Hello(client="marker"))
        assert isinstance(client.receive(120.0, want=(Welcome,)), Welcome)
        _mark(client)

        def scores_saved() -> bool:
            assert procs[0].poll() is None, procs[0].stderr.read()
            text = (directory / STATE_FILE).read_text() if (directory / STATE_FILE).exists() else "{}"
            try:
                policy = json.loads(text).get("policy", {})
            except json.JSONDecodeError:
                return False
            return [HARD_ID, 100.0] in policy.get("scores", [])

        first = _serve(client, 8)
        wait_for(scores_saved, "the scores in the state file", timeout=120)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=30)
        client.socket.close()
        endpoint = free_tcp_endpoint()
        procs.append(_start(command, endpoint))
        again = RawClient(context, endpoint)
        again.send(Hello(client="after-restart"))
        assert isinstance(again.receive(120.0, want=(Welcome,)), Welcome)
        second = _serve(again, SKIP + COUNTED)
        assert not {g.group_id for g in first} & {g.group_id for g in second}
        assert _share(second[SKIP:]) >= 5 / CAPTIONS
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
        context.destroy(linger=0)
