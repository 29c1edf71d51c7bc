"""Read rate of the offline reader against plain ``webdataset`` on the same shards (``stablerep-bench offline``).

A read set is ``GROUPS`` caption groups of ``IMAGES`` PNGs of ``PX`` px each, written by the generator's
``ShardWriter``. Both readers are timed as one DataLoader worker runs (one process, no batching):
this reader draws the global shuffle (one ranged read per group, :func:`iterate_samples`), plain
``webdataset`` reads the shards in order and decodes with ``.decode("rgb8")``. From a local S3
server (moto in its own process on 127.0.0.1, as a store runs apart from its clients) the reader is
timed with direct GETs over signed URLs (``reader_s3``) and through the filesystem's client
(``reader_s3_fs``), webdataset through an fsspec opener.
"""
from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from protocol.shards import ShardIndex, shard_name


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def set_images(content: str, size: int, count: int = 16) -> list[bytes]:
    """``count`` PNGs of ``size`` px a read set cycles through: procedural renders (the embedded
    default generator's images) or one flat colour each."""
    if content == "flat":
        return [encode_png(np.full((size, size, 3), v % 256, dtype=np.uint8)) for v in range(count)]
    from generator_service.procedural.grammar import sample_captions
    from generator_service.procedural.render import render_captions

    images = render_captions(sample_captions(count, seed=3), list(range(count)), size, size)
    return [encode_png(image) for image in images]


def write_group_set(root: Path, groups: int, m: int, size: int, shard_size: int, images: list[bytes]) -> None:
    """A real shard set (images, indexes, manifest) through the generator's ShardWriter."""
    from generator_service.config import GeneratorConfig
    from generator_service.shards import ShardWriter
    from protocol import Group

    config = GeneratorConfig(backend="procedural", images_per_group=m, save_size=size)
    with ShardWriter(root, config, shard_size=shard_size) as writer:
        for cid in range(groups):
            writer.write(Group(group_id=f"g{cid:09d}", caption_id=cid, caption=f"caption {cid}", seeds=list(range(m)),
                               encoded=[images[(cid + j) % len(images)] for j in range(m)], encoding="png",
                               shape=(m, size, size, 3), generator=config.fingerprint(), gen_seconds=0.0))


def _timed(fn: Callable[[], int]) -> tuple[float, float]:
    """``(groups/s, CPU ms of this process per group)`` of ``fn``, which returns the groups it read."""
    cpu, wall = time.process_time(), time.perf_counter()
    groups = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return groups / wall, 1e3 * cpu / max(groups, 1)


def rate_reader(data: str, m: int, groups: int, ahead: int | None = None, direct_gets: bool = True) -> tuple[float, float]:
    """One worker of this reader: the first ``groups`` of a shuffled epoch, decoded in plan order."""
    from trainer.data.sources.offline import OfflineSource
    from trainer.data.sources.offline_reader import iterate_samples
    from trainer.data.sources.offline_stream import epoch_order

    source = OfflineSource(data, captions_per_rank=1, draw_per_caption=m, num_workers=0, seed=1)
    plan = epoch_order(source.index.num_samples, 0, 1, shuffle=True)[:groups]

    def read() -> int:
        items = iterate_samples(plan, source.index, source.parts, source.tables, worker=0, epoch=0, seed=1, n=m,
                                image_size=source.image_size, fetch_ahead=ahead, direct_gets=direct_gets)
        return sum(1 for item in items if item.group is not None)

    return _timed(read)


def rate_webdataset(urls: list[str], groups: int) -> tuple[float, float]:
    """Plain webdataset reading and decoding the same shards in order."""
    import webdataset as wds

    def read() -> int:
        dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8")
        return sum(1 for _, _ in zip(range(groups), dataset))

    return _timed(read)


def use_fsspec_in_webdataset(*schemes: str) -> None:
    """Plain webdataset opens s3://, http:// and ``schemes`` through fsspec (its documented way to add a
    URL scheme)."""
    from fsspec.core import url_to_fs
    from webdataset.gopen import gopen_schemes

    def open_fsspec(url, mode="rb", bufsize=8192, **_kw):
        fs, path = url_to_fs(url)
        return fs.open(path, mode, block_size=8 << 20)

    for scheme in ("s3", "http", *schemes):
        gopen_schemes[scheme] = open_fsspec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _process_on_port(command: list[str], port: int, what: str) -> Iterator[str]:
    """Run ``command`` (a server listening on ``port`` of 127.0.0.1) until the block ends; yields its URL."""
    repo = str(Path(__file__).resolve().parents[1])  # for ``python -m benchmarks...`` from any folder
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{what} did not start on 127.0.0.1:{port}") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextmanager
def _delayed(port: int, latency_ms: float, direct: str) -> Iterator[str]:
    """``direct`` itself, or with ``latency_ms`` a proxy to ``port`` that delays each request by that much."""
    if not latency_ms:
        yield direct
        return
    proxy_port = _free_port()
    with _process_on_port([sys.executable, "-m", "benchmarks.latency_proxy", str(proxy_port), str(port),
                           str(latency_ms)], proxy_port, "the latency proxy") as delayed:
        yield delayed


@contextmanager
def s3_server_process(latency_ms: float = 0.0) -> Iterator[tuple[str, str]]:
    """moto's S3 server in its own process on a free port of 127.0.0.1; yields ``(endpoint the readers
    use, the server's own endpoint)``: with ``latency_ms``, the readers' one is a proxy that delays
    each request by that much (:mod:`benchmarks.latency_proxy`)."""
    port = _free_port()
    with _process_on_port([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port,
                          "moto's S3 server") as direct, _delayed(port, latency_ms, direct) as endpoint:
        yield endpoint, direct


def http_rates(local: Path, m: int, groups: int, shards: int, ahead: int, repeats: int,
               latency_ms: float = 0.0) -> tuple[dict[str, float], dict[str, float]]:
    """Both readers from ``local`` served by a range-answering HTTP store in its own process
    (:mod:`benchmarks.range_server`: a ranged GET costs time in proportion to its range, as in an
    object store; moto's S3 server builds the whole object for each one)."""
    rates: dict[str, float] = {}
    cpu: dict[str, float] = {}
    port = _free_port()
    with _process_on_port([sys.executable, "-m", "benchmarks.range_server", str(port), str(local)], port,
                          "the HTTP store") as direct, _delayed(port, latency_ms, direct) as base:
        use_fsspec_in_webdataset()
        urls = [f"{base}/{shard_name(k)}" for k in range(shards)]
        for _ in range(repeats):
            _keep_best(rates, cpu, "reader_http", rate_reader(base, m, groups, ahead))
            _keep_best(rates, cpu, "webdataset_http", rate_webdataset(urls, groups))
    return rates, cpu


def rate_store_gets(url: str, groups: int, ahead: int) -> float:
    """Ranged GETs/s the store answers for the samples of the tar ``url`` (``ahead`` at once, no
    decoding, direct GETs): the most groups/s any reader with one GET per group gets from it."""
    from infra import storage
    from infra.signed_ranges import SignedRanges

    ranges = ShardIndex.from_bytes(storage.read_bytes(url + ".idx"), url + ".idx").ranges
    reader = SignedRanges(ahead)
    try:
        start = time.perf_counter()
        for first in range(0, groups, ahead):
            reader.read([(url, int(ranges[k % len(ranges)][0]), int(ranges[k % len(ranges)][1]))
                         for k in range(first, min(first + ahead, groups))])
        return groups / (time.perf_counter() - start)
    finally:
        reader.close()


def _keep_best(rates: dict[str, float], cpu: dict[str, float], name: str, measured: tuple[float, float]) -> None:
    if measured[0] > rates.get(name, 0.0):
        rates[name], cpu[name] = measured


def local_rates(folder: Path, m: int, groups: int, shards: int, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Both readers from local disk, best of ``repeats`` interleaved runs: ``(groups/s, CPU ms per group)``."""
    urls = [str(folder / shard_name(k)) for k in range(shards)]
    rates: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for _ in range(repeats):  # interleaved, best kept: the machine may be shared
        _keep_best(rates, cpu, "reader_local", rate_reader(str(folder), m, groups))
        _keep_best(rates, cpu, "webdataset_local", rate_webdataset(urls, groups))
    return rates, cpu


def s3_rates(local: Path, m: int, groups: int, shards: int, aheads: list[int], repeats: int,
             latency_ms: float = 0.0) -> tuple[dict[str, float], dict[str, float]]:
    """Upload ``local`` to a moto server on 127.0.0.1 and time both readers from it (best of
    ``repeats`` interleaved runs): ``(groups/s, CPU ms per group)`` by reader."""
    import boto3
    import s3fs

    rates: dict[str, float] = {}
    cpu: dict[str, float] = {}
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec keeps filesystems by their arguments: not the old endpoint's
    with s3_server_process(latency_ms) as (endpoint, direct):
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            client = boto3.client("s3", endpoint_url=direct)
            client.create_bucket(Bucket="bench")
            for entry in sorted(local.iterdir()):
                client.upload_file(str(entry), "bench", f"shards/{entry.name}")
            use_fsspec_in_webdataset()
            urls = [f"s3://bench/shards/{shard_name(k)}" for k in range(shards)]
            for _ in range(repeats):
                for ahead in aheads:
                    name = "reader_s3" if ahead == aheads[0] else f"reader_s3_ahead{ahead}"
                    _keep_best(rates, cpu, name, rate_reader("s3://bench/shards", m, groups, ahead))
                _keep_best(rates, cpu, "reader_s3_fs", rate_reader("s3://bench/shards", m, groups, aheads[0], False))
                _keep_best(rates, cpu, "webdataset_s3", rate_webdataset(urls, groups))
                rates["store_gets_s3"] = max(rates.get("store_gets_s3", 0.0), rate_store_gets(urls[0], groups, aheads[0]))
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    return rates, cpu


def store_rates(local: Path, store_url: str, m: int, groups: int, shards: int, ahead: int,
                repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Both readers from a store of yours (``--store-url``, e.g. ``s3://bucket/prefix``: credentials and
    endpoint from the usual environment): ``local`` is uploaded under ``store_url/<folder name>`` once
    (skipped when its manifest is there), then timed like the local stores (``reader_store``,
    ``reader_store_fs``, ``webdataset_store``)."""
    from infra import storage

    target = storage.join(store_url, local.name)
    if not storage.exists(storage.join(target, "manifest.json")):
        for entry in sorted(local.iterdir()):  # the manifest last: the commit point, as the writer does it
            if entry.name != "manifest.json" and entry.is_file():
                storage.upload(str(entry), storage.join(target, entry.name))
        storage.upload(str(local / "manifest.json"), storage.join(target, "manifest.json"))
    use_fsspec_in_webdataset(storage.scheme_of(target) or "file")
    urls = [storage.join(target, shard_name(k)) for k in range(shards)]
    rates: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for _ in range(repeats):
        _keep_best(rates, cpu, "reader_store", rate_reader(target, m, groups, ahead))
        _keep_best(rates, cpu, "reader_store_fs", rate_reader(target, m, groups, ahead, False))
        _keep_best(rates, cpu, "webdataset_store", rate_webdataset(urls, groups))
    return rates, cpu


def ratios(rates: dict[str, Any]) -> dict[str, float]:
    """This reader's groups/s over webdataset's, per store."""
    out = {}
    for store in ("local", "s3", "http", "store"):
        if rates.get(f"webdataset_{store}") and f"reader_{store}" in rates:
            out[store] = rates[f"reader_{store}"] / rates[f"webdataset_{store}"]
    return out
