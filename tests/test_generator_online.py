"""Online mode: a 2-worker service serves protocol v1 clients within their credits and archives what it serves."""
from __future__ import annotations

import itertools
import re
import threading
import time

import msgpack
import numpy as np
import zmq

from generator_service.captions import load_captions
from generator_service.config import GeneratorConfig
from generator_service.pool import StopSignal
from generator_service.procedural import write_caption_file
from generator_service.service import ServiceOptions, epoch_seeds, group_id_for, run_service, work_items
from generator_service.shards import read_manifest
from protocol import Credit, Error, Group, Heartbeat, Hello, Welcome, decode, encode
from protocol.client import GroupClient
from tests.polling import wait_for

M = 2
QUEUE = 3


class RawClient:
    """A bare DEALER speaking protocol v1 by hand, sending a heartbeat while it waits."""

    def __init__(self, context: zmq.Context, endpoint: str) -> None:
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.greeted = False

    def send(self, msg) -> None:
        self.greeted = self.greeted or isinstance(msg, Hello)
        self.socket.send_multipart(encode(msg))

    def receive(self, timeout: float, want=(Group, Welcome, Error)):
        """The next message of a wanted type within ``timeout`` seconds, else None."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.socket.poll(int(min(left, 0.3) * 1000)):
                msg = decode(self.socket.recv_multipart())
                if isinstance(msg, want):
                    if isinstance(msg, Group):
                        msg.images = msg.images.copy()
                    return msg
            if self.greeted:
                self.send(Heartbeat())
        return None




def test_online_service_serves_within_credits_survives_garbage_and_archives(tmp_path, tiny_sd_path):
    config = GeneratorConfig(
        backend="diffusers", model=str(tiny_sd_path), steps=2, height=32, width=32, save_size=32,
        images_per_group=M, dtype="fp32",
    )
    fingerprint = config.fingerprint()
    captions = load_captions(write_caption_file(tmp_path / "captions.txt", 5))
    archive = tmp_path / "archive"
    options = ServiceOptions(
        config=config, captions=captions, devices=["cpu", "cpu"], seed=3, worker_batch=2,
        bind="tcp://127.0.0.1:*", queue=QUEUE, archive=str(archive), shard_size=2,
        preview=str(tmp_path / "preview.png"), preview_groups=2,
    )
    stop = StopSignal()
    started: dict = {}
    live: dict = {}
    outcome: dict = {}

    def serve():
        try:
            outcome["result"] = run_service(
                options, stop=stop, on_start=started.update, on_tick=lambda pool, server: live.update(pool=pool, server=server)
            )
        except BaseException as exc:  # surfaced by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    wait_for(lambda: "endpoint" in started or "error" in outcome, "the service to bind", timeout=60)
    assert "error" not in outcome, outcome.get("error")
    endpoint = started["endpoint"]
    context = zmq.Context()
    received: list[Group] = []
    try:
        raw = RawClient(context, endpoint)
        # Garbage first: not msgpack, then a wrong version. Both get an error; the service goes on.
        raw.socket.send_multipart([b"\xc1 this is not msgpack"])
        assert raw.receive(10).code == "bad_message"
        raw.socket.send_multipart([msgpack.packb({"v": 99, "type": "hello", "client": "x", "rank": 0, "world_size": 1})])
        assert raw.receive(10).code == "version"

        raw.send(Hello(client="raw", rank=0, world_size=1))
        welcome = raw.receive(10)
        assert isinstance(welcome, Welcome) and welcome.generator.fingerprint == fingerprint
        raw.send(Credit(n=3))
        for _ in range(3):
            group = raw.receive(180)
            assert isinstance(group, Group), "no group within the credits granted"
            received.append(group)
        # The queue fills up while this client has no credit; nothing more may arrive.
        wait_for(lambda: live["server"].stats().queue_depth == QUEUE, "a full queue", timeout=120)
        assert raw.receive(1.5, want=(Group,)) is None
        raw.send(Credit(n=2))
        for _ in range(2):
            group = raw.receive(30)
            assert isinstance(group, Group)
            received.append(group)

        got: list[Group] = []
        lock = threading.Lock()

        def on_group(group: Group) -> None:
            with lock:
                got.append(Group(**{**group.__dict__, "images": group.images.copy()}))

        client = GroupClient([endpoint], on_group, client_name="trainer", credits=4, connect_timeout=30)
        client.start()
        try:
            wait_for(lambda: len(got) >= 8, "8 groups at the GroupClient", timeout=180)
        finally:
            client.close()
        with lock:
            received.extend(got)
    finally:
        raw.socket.close(linger=0)
        stop.request()
        thread.join(timeout=120)
        context.destroy(linger=0)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]

    ids = [g.group_id for g in received]
    # at-least-once: a group is sent again only after its client's session ended unacknowledged
    assert len(ids) - len(set(ids)) <= result.server["requeued"], "a group was sent twice without a re-queue"
    for group in received:
        assert group.group_id.endswith("-s3"), "a base seed other than 0 is part of the id"
        epoch_part = re.search(r"-e(\d+)", group.group_id)
        epoch = int(epoch_part.group(1)) if epoch_part else 0
        assert group.seeds == epoch_seeds(3, group.caption_id, epoch, M)
        assert group.caption == captions.caption_of(group.caption_id)
        assert group.generator == fingerprint and group.shape == (M, 32, 32, 3)
        assert group.images.dtype == np.uint8 and group.images.shape == (M, 32, 32, 3)
    assert any("-e" in i for i in ids), "online mode should cycle the 5 captions into a second epoch"

    assert result.server["bad_messages"] >= 2
    assert sum(w["idle_backpressure_s"] for w in result.stats.workers) > 0
    assert (tmp_path / "preview.png").stat().st_size > 0
    manifest = read_manifest(archive)
    archived = {g for s in manifest.shards for g in s.group_ids}
    assert set(ids) <= archived
    # every group handed to the server, plus those still waiting for a client at the stop
    assert len(archived) == result.stats.groups_delivered + result.stats.settled_at_stop



def test_services_differing_only_in_seed_never_share_a_group_id(tmp_path):
    """Two services on one caption file with different --seed make different images: a trainer that
    drops repeated ids must not drop the second service's groups."""
    captions = load_captions(write_caption_file(tmp_path / "captions.txt", 4))
    fingerprint = GeneratorConfig(backend="procedural").fingerprint()

    def two_epochs(seed):
        return {item.group_id: item.seeds for item in itertools.islice(work_items(captions, fingerprint, seed, 2, None), 8)}

    seed0, seed5 = two_epochs(0), two_epochs(5)
    assert not set(seed0) & set(seed5)
    assert not {s for seeds in seed0.values() for s in seeds} & {s for seeds in seed5.values() for s in seeds}
    assert sorted(seed0) == sorted([group_id_for(fingerprint, c, e) for e in (0, 1) for c, _ in captions])
    assert group_id_for(fingerprint, 7) == f"{fingerprint[:8]}-000000007"  # seed 0: the ids of earlier versions
    assert group_id_for(fingerprint, 7, 2, 5) == f"{fingerprint[:8]}-000000007-e2-s5"
