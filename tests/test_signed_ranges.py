"""Direct ranged GETs (infra/signed_ranges.py): every range reads the same bytes as through the fsspec
filesystem, from moto's real S3 server (a presigned URL per object) and from a plain HTTP store; a
missing object is ``FileNotFoundError`` in its own slot; a store that refuses direct GETs is read
through the filesystem instead, from then on; behind a proxy the filesystem is used from the start."""
from __future__ import annotations

import boto3
import pytest

from infra import storage
from infra.signed_ranges import SignedRanges
from tests.http_server import http_store
from tests.s3_server import s3_server

DATA = bytes(range(256)) * 40  # 10240 bytes
RANGES = [(0, 512), (700, 1900), (10000, 10240), (10200, 10400)]  # the last runs past the end


def test_s3_ranges_equal_the_filesystems_and_missing_objects_fail_alone(monkeypatch):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    with s3_server(monkeypatch):
        boto3.client("s3").put_object(Bucket="bucket", Key="shards/a.tar", Body=DATA)
        url, missing = "s3://bucket/shards/a.tar", "s3://bucket/shards/gone.tar"
        wanted = [(url, a, b) for a, b in RANGES]
        reader = SignedRanges(concurrency=4)
        try:
            found = reader.read(wanted + [(missing, 0, 10)] + wanted[:1])
            assert found[: len(RANGES)] == storage.read_ranges(wanted) == [DATA[a:b] for a, b in RANGES]
            assert isinstance(found[len(RANGES)], FileNotFoundError) and found[-1] == DATA[:512]
            assert reader.direct_ranges == len(RANGES) + 2 and reader.refused == frozenset()
        finally:
            reader.close()
        off = SignedRanges(concurrency=4, enabled=False)  # --no-direct-gets: the filesystem's client
        assert off.read(wanted) == [DATA[a:b] for a, b in RANGES] and off.direct_ranges == 0


def test_a_store_refusing_direct_gets_is_read_through_the_filesystem(tmp_path):
    pytest.importorskip("aiohttp")  # fsspec's HTTP filesystem
    (tmp_path / "a.tar").write_bytes(DATA)
    with http_store(tmp_path) as base:  # a store that serves every client: direct GETs
        reader = SignedRanges(concurrency=2)
        wanted = [(f"{base}/a.tar", a, b) for a, b in RANGES[:3]]
        assert reader.read(wanted) == [DATA[a:b] for a, b in RANGES[:3]] and reader.direct_ranges == 3
        reader.close()
    with http_store(tmp_path, refuse_user_agent="python-urllib3") as base:  # 403 to urllib3, 206 to aiohttp
        reader = SignedRanges(concurrency=2)
        wanted = [(f"{base}/a.tar", a, b) for a, b in RANGES[:3]]
        for _ in range(2):  # refused once, then the filesystem from the start
            assert reader.read(wanted) == [DATA[a:b] for a, b in RANGES[:3]]
            assert reader.direct_ranges == 0 and reader.refused == {"http"}
        reader.close()


def test_a_store_ignoring_range_or_sending_too_much_costs_no_more_than_the_range(tmp_path):
    """A 200 with the whole object is read only up to the range's end; a 206 longer than asked is an
    error for that range alone (the reader reads one byte past what it asked for, never the rest)."""
    big = bytes(range(256)) * 4096  # 1 MiB
    (tmp_path / "a.tar").write_bytes(big)
    wanted = [(0, 512), (700, 1900)]
    with http_store(tmp_path, answer="whole") as base:
        reader = SignedRanges(concurrency=2)
        assert reader.read([(f"{base}/a.tar", a, b) for a, b in wanted]) == [big[a:b] for a, b in wanted]
        assert reader.direct_ranges == 2 and reader.refused == frozenset()
        reader.close()
    with http_store(tmp_path, answer="overlong") as base:
        reader = SignedRanges(concurrency=2)
        found = reader.read([(f"{base}/a.tar", a, b) for a, b in wanted])
        assert all(isinstance(f, OSError) and "more than the" in str(f) for f in found)
        assert reader.refused == frozenset()
        reader.close()


def test_behind_a_proxy_the_filesystem_reads(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    assert not SignedRanges().enabled
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.delenv("https_proxy", raising=False)
    assert SignedRanges().enabled
