"""A real S3-compatible server for tests: moto's standalone server on 127.0.0.1, started by the test.

Clients find it the way they find any S3-compatible store (MinIO, Ceph, R2): through the standard
``AWS_ENDPOINT_URL`` and credential environment variables, with no project setting.
"""
from __future__ import annotations

import tempfile
import urllib.request
from contextlib import contextmanager
from typing import Iterator

from tests.train_helpers import free_port


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment a user sets for an S3-compatible endpoint."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def forget_s3_clients() -> None:
    """fsspec caches filesystem instances by their arguments; a changed environment needs fresh ones."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@contextmanager
def s3_server(monkeypatch, buckets: tuple[str, ...] = ("bucket",)) -> Iterator[str]:
    """Start moto's server on a free port of 127.0.0.1, point the AWS environment at it, create
    ``buckets``; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        # moto keeps its buckets in process-wide state that outlives a server: start every test empty
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30).close()
        for key, value in s3_env(endpoint).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("STABLEREP_STAGING", tempfile.mkdtemp(prefix="stablerep-staging-"))  # not ~/.cache
        forget_s3_clients()
        import boto3

        client = boto3.client("s3")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()
        forget_s3_clients()
