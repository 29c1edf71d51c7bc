"""Shard sets in an object store: the generator's ShardWriter writes s3:// (index, shard, then the
manifest as commit point), the trainer reads it with one ranged GET per group, an unindexed tar in a
bucket is scanned once and cached beside it, and bad URLs are one line with exit 2 before any model
is built. The store is moto's real S3 server on 127.0.0.1, started by the test (tests/s3_server.py)."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import boto3
import pytest

from generator_service.config import GeneratorConfig
from generator_service.shards import ShardWriter
from infra import storage
from protocol.shards import MANIFEST_NAME, Manifest, ShardIndex
from tests.s3_server import forget_s3_clients, s3_server
from tests.test_offline_source import S, add_member, encode, read_groups, write_generator_dir
from tests.train_helpers import free_port
from trainer.config import build_config
from trainer.data.sources.offline import OfflineSource
from trainer.data.sources.offline_index import count_groups

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BIN = Path(sys.executable).parent


@pytest.fixture
def endpoint(monkeypatch):
    with s3_server(monkeypatch, buckets=("bucket", "plain")) as url:
        yield url


def keys(bucket: str, prefix: str = "") -> list[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_writer_and_reader_through_a_bucket(endpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URL taken for a local path would show up here as a folder "s3:"
    ids = write_generator_dir("s3://bucket/run/shards", shards=3, per_shard=4, m=2)
    assert not (tmp_path / "s3:").exists()
    assert keys("bucket") == sorted([f"run/shards/{MANIFEST_NAME}"] + [
        f"run/shards/shard-{k:06d}.tar{ext}" for k in range(3) for ext in ("", ".idx")])
    index = ShardIndex.from_bytes(storage.read_bytes("s3://bucket/run/shards/shard-000001.tar.idx"), "idx")
    assert index.count == 4 and index.identity == ""

    source = OfflineSource("s3://bucket/run/shards", captions_per_rank=4, draw_per_caption=2, num_workers=2, seed=3)
    assert source.image_size == S and count_groups("s3://bucket/run/shards") == 12
    assert sorted(read_groups(source, 3)) == ids  # every group once per epoch, workers reading ranged GETs
    assert sorted(read_groups(source, 3)) == ids
    source.close()

    # A writer killed after uploading shard 2 but before listing it: the rerun adopts it, no duplicates.
    manifest = Manifest.from_dict(json.loads(storage.read_bytes("s3://bucket/run/shards/manifest.json")), "m")
    manifest.shards = manifest.shards[:2]
    storage.write_bytes("s3://bucket/run/shards/manifest.json", json.dumps(manifest.to_dict()).encode())
    with ShardWriter("s3://bucket/run/shards", GeneratorConfig(backend="procedural", images_per_group=2, save_size=S),
                     shard_size=4) as writer:
        assert len(writer.done_group_ids) == 12  # adopted at open: nothing left to write
        assert writer.groups_written == 0
    manifest = Manifest.from_dict(json.loads(storage.read_bytes("s3://bucket/run/shards/manifest.json")), "m")
    assert [s.name for s in manifest.shards] == [f"shard-{k:06d}.tar" for k in range(3)]
    assert sorted(c for s in manifest.shards for c in s.caption_ids) == ids

    # a shard deleted from the store mid-run: its groups are counted and skipped, training goes on
    source = OfflineSource("s3://bucket/run/shards", captions_per_rank=4, draw_per_caption=2, num_workers=0, seed=3)
    boto3.client("s3").delete_object(Bucket="bucket", Key="run/shards/shard-000002.tar")
    assert len(read_groups(source, 4)) == 16
    assert source.stats()["skipped_corrupt"] >= 4


def test_unindexed_tars_in_a_bucket_are_scanned_once(endpoint, tmp_path, caplog):
    client = boto3.client("s3")
    for s in range(2):
        local = tmp_path / f"{s:05d}.tar"
        with tarfile.open(local, "w") as archive:
            for k in range(3):
                add_member(archive, f"{s:05d}{k:04d}.png", encode(50 + k))
                add_member(archive, f"{s:05d}{k:04d}.txt", b"a photo")
        client.upload_file(str(local), "plain", f"wds/{s:05d}.tar")
    url = "s3://plain/wds/{00000..00001}.tar"
    source = OfflineSource(url, captions_per_rank=6, draw_per_caption=1, num_workers=0, image_size=S)
    assert source.next_batch().images.shape == (6, 1, S, S, 3)
    cache = ShardIndex.from_bytes(storage.read_bytes("s3://plain/wds/00000.tar.idx"), "cache")
    assert cache.identity.startswith("etag:") and cache.count == 3
    # the tar is replaced in the store (new ETag): the cache is refused, named, and rebuilt
    client.upload_file(str(tmp_path / "00001.tar"), "plain", "wds/00000.tar")
    forget_s3_clients()
    OfflineSource(url, captions_per_rank=6, draw_per_caption=1, num_workers=0, image_size=S)
    assert "wds/00000.tar.idx: cached for etag:" in caplog.text


def test_an_epoch_of_a_bucket_is_counted_from_its_indexes(endpoint, tmp_path):
    """A run given in epochs on s3:// data takes its length from the bucket: generator shards from
    their sample indexes, plain tars from one scan whose cache lands beside them."""
    write_generator_dir("s3://bucket/epochs/shards", shards=3, per_shard=5, m=2)
    client = boto3.client("s3")
    for s in range(2):
        local = tmp_path / f"{s:05d}.tar"
        with tarfile.open(local, "w") as archive:
            for k in range(4 + s):
                add_member(archive, f"{s:05d}{k:04d}.png", encode(50 + k))
                add_member(archive, f"{s:05d}{k:04d}.txt", b"a photo")
        client.upload_file(str(local), "plain", f"epochs/{s:05d}.tar")
    for data, groups in ((["s3://bucket/epochs/shards"], 15), (["s3://plain/epochs/{00000..00001}.tar"], 9)):
        cfg = build_config("cpu_small", overrides={"data": {"source": "offline", "data": data, "captions_per_step": 2},
                                                   "schedule": {"steps": None, "epochs": 3.0, "warmup_steps": 0}})
        assert cfg.epoch_captions() == groups and cfg.total_steps() == 3 * (groups // 2)
    assert "epochs/00001.tar.idx" in keys("plain", "epochs/")


def test_bad_urls_are_one_line_and_exit_2_before_any_model(endpoint, tmp_path, monkeypatch, capsys):
    from trainer import cli

    train = ["--preset", "cpu_small", "--source", "offline", "--steps", "1", "--output", str(tmp_path / "run"),
             "--no-progress", "--data"]
    no_credentials = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                      "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")}
    cases = {
        "missing bucket": ("s3://no-such-bucket/shards", {}, "bucket s3://no-such-bucket not found"),
        "unknown scheme": ("nosuch://bucket/shards", {}, "unknown URL scheme nosuch://"),
        "unreachable endpoint": ("s3://bucket/shards", {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"},
                                 "endpoint unreachable"),
        "no credentials": ("s3://bucket/shards", no_credentials, "credentials"),
    }
    for name, (url, env, expected) in cases.items():
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.delenv(key) if value is None else patch.setenv(key, value)
            forget_s3_clients()
            code = cli.main([*train, url])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0] and url in lines[0], (name, lines)
        assert not (tmp_path / "run").exists()  # refused before anything was written
    forget_s3_clients()
    (tmp_path / "c.txt").write_text("a red triangle with stripes on a dark background\n")
    proc = subprocess.run([str(BIN / "stablerep-generator"), "--captions", str(tmp_path / "c.txt"), "--backend",
                           "procedural", "--gpus", "cpu:1", "--out", "nosuch://bucket/shards"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "unknown URL scheme nosuch://" in proc.stderr, proc.stderr
    assert not (tmp_path / "nosuch:").exists()


def test_generator_cli_writes_a_bucket(endpoint, tmp_path):
    captions = tmp_path / "captions.txt"
    subprocess.run([str(BIN / "stablerep-generator"), "captions", "--n", "6", "--out", str(captions)], check=True,
                   capture_output=True, timeout=120)
    proc = subprocess.run([str(BIN / "stablerep-generator"), "--captions", str(captions), "--backend", "procedural",
                           "--gpus", "cpu:1", "--images-per-group", "2", "--save-size", "16", "--shard-size", "4",
                           "--no-progress", "--out", "s3://bucket/cli/shards"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "s3:").exists()  # nothing written to a local folder named after the URL
    assert {"cli/shards/manifest.json", "cli/shards/shard-000001.tar", "cli/shards/shard-000001.tar.idx"} <= set(
        keys("bucket", "cli/"))
    assert count_groups("s3://bucket/cli/shards") == 6


def test_a_writer_killed_mid_shard_loses_no_group_of_a_bucket(endpoint, tmp_path):
    """kill -9 with a shard open: its groups wait in the staging folder (one per output URL and
    endpoint), the rerun salvages and uploads them before listing them, and the bucket ends up with
    every group once; the staging folder is gone after a clean close."""
    from generator_service.shards import staging_dir
    from tests.test_shards import CONFIG, make_group

    url = "s3://bucket/killed/shards"
    script = (
        "import os, signal\n"
        "from generator_service.shards import ShardWriter\n"
        "from tests.test_shards import CONFIG, make_group\n"
        f"w = ShardWriter({url!r}, CONFIG, shard_size=4).open()\n"
        "for cid in range(6):\n"
        "    w.write(make_group(cid))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    repo = str(Path(__file__).resolve().parents[1])
    killed = subprocess.run([sys.executable, "-c", script], cwd=repo, timeout=120)
    assert killed.returncode == -9
    listed = Manifest.from_dict(json.loads(storage.read_bytes(f"{url}/manifest.json")), "m")
    assert [s.caption_ids for s in listed.shards] == [[0, 1, 2, 3]]  # groups 4, 5 were only staged
    assert any(staging_dir(url).iterdir())

    with ShardWriter(url, CONFIG, shard_size=4) as resumed:
        assert resumed.done_caption_ids == {0, 1, 2, 3, 4, 5}
        for cid in (6, 7):
            resumed.write(make_group(cid))
    manifest = Manifest.from_dict(json.loads(storage.read_bytes(f"{url}/manifest.json")), "m")
    assert [s.caption_ids for s in manifest.shards] == [[0, 1, 2, 3], [4, 5], [6, 7]]
    assert keys("bucket", "killed/") == sorted([f"killed/shards/{MANIFEST_NAME}"] + [
        f"killed/shards/shard-{k:06d}.tar{ext}" for k in range(3) for ext in ("", ".idx")])
    assert not staging_dir(url).exists()
    source = OfflineSource(url, captions_per_rank=4, draw_per_caption=2, num_workers=0, seed=1)
    assert sorted(read_groups(source, 2)) == list(range(8))


def test_the_offline_bench_reads_from_a_store_named_by_url(endpoint, tmp_path):
    """``stablerep-bench offline --store-url``: the read set is uploaded to that prefix once and both
    readers are timed from it (here moto's server stands in for a lab's bucket)."""
    from benchmarks.cli import main

    assert main(["offline", "--quick", "--no-s3", "--store-url", "s3://bucket/bench", "--output", str(tmp_path)]) == 0
    point = json.loads((tmp_path / "offline.json").read_text())["results"]["read_sets"]["2x16"]
    assert point["groups_per_s"]["reader_store"] > 0 and point["groups_per_s"]["webdataset_store"] > 0
    assert point["ratios"]["store"] > 0 and point["cpu_ms_per_group"]["reader_store_fs"] > 0
    uploaded = [k for k in keys("bucket", "bench/") if k.endswith("manifest.json")]
    assert len(uploaded) == 1
