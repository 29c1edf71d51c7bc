"""CurveZMQ: the right key is served; no key, an unknown key and a wrong server key are refused."""
from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zmq

from generator_service.cli import main as generator_main
from generator_service.config import GeneratorConfig
from generator_service.procedural import write_caption_file
from protocol import Group, Hello, encode
from protocol.client import GroupClient
from protocol.curve import CurveClient, CurveKeyError, CurveServer, write_keys
from protocol.server import GroupServer
from tests.test_train_cli import read_summary, train_args
from tests.train_helpers import free_tcp_endpoint
from trainer import cli as train_cli
from trainer.cli import parse_config
from tests.polling import wait_for

REPO = Path(__file__).resolve().parents[1]
GENERATOR = GeneratorConfig(images_per_group=2, save_size=8).welcome_info()


def _group(i: int) -> Group:
    return Group(group_id=f"g{i:04d}", caption_id=i, caption=f"caption {i}", seeds=[i, i + 1],
                 images=np.full((2, 4, 4, 3), i % 256, np.uint8), generator="fp", gen_seconds=0.1)




def test_keys_are_written_once_with_private_secrets(tmp_path, capsys):
    keys = tmp_path / "keys"
    assert generator_main(["keys", str(keys)]) == 0
    assert f"--curve-keys {keys}" in capsys.readouterr().out
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret", "authorized/client.key"):
        assert (keys / name).is_file(), name
    for secret in ("server.key_secret", "client.key_secret"):
        assert stat.S_IMODE((keys / secret).stat().st_mode) == 0o600
    assert (keys / "authorized" / "client.key").read_bytes() == (keys / "client.key").read_bytes()
    before = (keys / "server.key_secret").read_bytes()
    assert generator_main(["keys", str(keys)]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert (keys / "server.key_secret").read_bytes() == before


def test_incomplete_key_directories_are_refused_naming_the_file(tmp_path):
    with pytest.raises(CurveKeyError, match=r"server.key_secret: no such key file"):
        CurveServer(tmp_path)
    keys = write_keys(tmp_path / "keys")
    (keys / "authorized" / "client.key").unlink()
    with pytest.raises(CurveKeyError, match=r"authorized: no authorized client keys"):
        CurveServer(keys)
    (keys / "client.key_secret").write_text("garbage\n")
    with pytest.raises(CurveKeyError, match=r"client.key_secret"):
        CurveClient(keys)


def test_only_the_authorized_key_is_served(tmp_path):
    keys = write_keys(tmp_path / "keys")
    unknown = write_keys(tmp_path / "unknown")  # right server key below, client key never authorized
    shutil.copyfile(keys / "server.key", unknown / "server.key")
    stranger = write_keys(tmp_path / "stranger")  # another service's keys altogether
    server = GroupServer("tcp://127.0.0.1:*", "curve-svc", GENERATOR, heartbeat_ms=200, max_queue=1000,
                         curve=CurveServer(keys)).start()
    received: list[str] = []
    good = GroupClient([server.endpoint], lambda g: received.append(g.group_id), client_name="good", credits=4,
                       connect_timeout=20, curve=CurveClient(keys))
    context = zmq.Context()
    try:
        good.start()
        for i in range(20):
            server.put(_group(i))
        wait_for(lambda: len(received) == 20, what="the good client's first 20 groups")

        for curve in (None, CurveClient(unknown), CurveClient(stranger)):
            with pytest.raises(ConnectionError, match="no welcome"):
                GroupClient([server.endpoint], lambda g: None, client_name="intruder", connect_timeout=1.5,
                            curve=curve).start()
        wait_for(lambda: server.stats().auth_refused >= 1, what="the unknown key's refusal")
        # A plain socket writing a valid hello gets nothing, and nothing reaches the service.
        raw = context.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(server.endpoint)
        raw.send_multipart(encode(Hello(client="raw")))
        assert raw.poll(1000) == 0

        for i in range(20, 40):
            server.put(_group(i))
        wait_for(lambda: len(received) == 40, what="the good client's groups after the intruders")
        stats = server.stats()
        assert sorted(received) == [f"g{i:04d}" for i in range(40)]
        assert stats.bad_messages == 0 and stats.refused_clients == 0
        assert [c.split("#")[0] for c in stats.clients] == ["good"]
    finally:
        good.close()
        context.destroy(linger=0)
        server.close()


def test_trainer_config_carries_curve_keys(tmp_path):
    cfg, _ = parse_config(["--preset", "cpu_small", "--generators", "tcp://127.0.0.1:5555", "--curve-keys",
                           str(tmp_path)])
    assert cfg.data.curve_keys == str(tmp_path)


def test_both_clis_train_over_curve(tmp_path):
    keys = write_keys(tmp_path / "keys")
    captions = write_caption_file(tmp_path / "captions.txt", 48)
    endpoint = free_tcp_endpoint()
    service = subprocess.Popen(
        [sys.executable, "-m", "generator_service.cli", "--captions", str(captions), "--backend", "procedural",
         "--bind", endpoint, "--height", "32", "--width", "32", "--save-size", "32", "--images-per-group", "4",
         "--gpus", "cpu", "--no-progress", "--log-level", "WARNING", "--curve-keys", str(keys)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    out = tmp_path / "run"
    try:
        assert train_cli.main(train_args(endpoint, out, 3, "--curve-keys", str(keys))) == 0
    finally:
        service.kill()
        service.wait()
    summary = read_summary(out)
    assert summary["steps"] == 3 and summary["source_stats"]["groups_received"] >= 16


def test_every_refusal_is_summed_up_in_the_log_even_after_the_last_burst(tmp_path, caplog):
    """Refusals are logged once in full, then summed up; the summary of the last burst is written
    by the service's loop (and at close), not only when a later refusal happens to come."""
    import logging
    import re

    keys = write_keys(tmp_path / "keys")
    unknown = write_keys(tmp_path / "unknown")
    shutil.copyfile(keys / "server.key", unknown / "server.key")
    curve = CurveServer(keys, log_interval_s=3600)
    caplog.set_level(logging.WARNING, logger="protocol.curve")
    context = zmq.Context()
    server = GroupServer("tcp://127.0.0.1:*", "curve-svc", GENERATOR, heartbeat_ms=200, curve=curve).start()
    try:
        intruders = []
        for _ in range(12):
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            CurveClient(unknown).configure(sock)
            sock.connect(server.endpoint)
            intruders.append(sock)
        wait_for(lambda: server.stats().auth_refused >= 12, what="12 refusals")
        for sock in intruders:
            sock.close()
    finally:
        server.close()
        context.destroy(linger=0)
    lines = [r.getMessage() for r in caplog.records if "CURVE: refused a client" in r.getMessage()]
    logged = sum(1 if "[unauthorized key]" in line else int(re.search(r": (\d+) more", line).group(1)) for line in lines)
    assert logged == curve.refused >= 12, lines


def test_secret_keys_are_never_readable_by_others_and_trainers_get_no_service_secret(tmp_path, monkeypatch):
    """Each secret file is made where only its owner can reach it (a 0700 folder) and is 0600 before
    it moves into the key directory; ``DIR/trainer`` holds what a trainer needs and no service secret."""
    import os

    import zmq.auth

    made = []
    real = zmq.auth.create_certificates

    def spy(directory, name, metadata=None):
        public, secret = real(directory, name, metadata)
        made.append((stat.S_IMODE(os.stat(directory).st_mode), Path(secret)))
        return public, secret

    monkeypatch.setattr(zmq.auth, "create_certificates", spy)
    keys = write_keys(tmp_path / "keys")
    assert len(made) == 2 and all(mode == 0o700 for mode, _ in made)  # before: created in DIR itself, mode 0644
    trainer = keys / "trainer"
    assert sorted(p.name for p in trainer.iterdir()) == ["client.key", "client.key_secret", "server.key"]
    assert stat.S_IMODE(trainer.stat().st_mode) == 0o700
    assert stat.S_IMODE((trainer / "client.key_secret").stat().st_mode) == 0o600
    assert not list(keys.glob(".keys-*"))
    with GroupServer("tcp://127.0.0.1:*", "curve-svc", GENERATOR, heartbeat_ms=200, curve=CurveServer(keys)) as server:
        got: list[str] = []
        with GroupClient([server.endpoint], lambda g: got.append(g.group_id), credits=2, connect_timeout=20,
                         curve=CurveClient(trainer)):
            server.put(_group(1))
            wait_for(lambda: got == ["g0001"], what="the group over CURVE with the trainer folder")
