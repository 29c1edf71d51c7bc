"""``stablerep-bench offline``: start-up and read rate of the offline source at lab scale.

Measures, on shard sets written here (tiny images, so disk and time stay small):

- **start-up**: seconds to build the offline source (read the manifest and the shard indexes, build
  the global index) at each ``--sizes`` point, and the marginal cost per group between the smallest
  and each larger point. Points above ``--index-only-above`` groups are written *without image
  data*: a manifest, real shard indexes and sparse tars of the indexed size (the start-up path reads
  nothing else). With ``--scan``, the first start on the same tars without indexes (the scan-once
  path, which then caches) is timed too.
- **index memory**: bytes of the in-memory index per group.
- **read rate**: groups/s read and decoded by one process (what one DataLoader worker does), from
  local disk and, when moto is installed, from a local S3 server (moto on 127.0.0.1), by this reader
  (global shuffle, one ranged read per group) and by plain ``webdataset`` reading the same shards in
  order (its usual use; S3 through an fsspec opener). The S3 server runs in its own process, as a
  store does; the reader is timed at each ``--fetch-ahead`` (ranged GETs a worker issues at once),
  and ``store_gets_s3`` is the ranged GETs/s the server answers without any decoding (the ceiling
  of a reader with one GET per group).
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from protocol.shards import Manifest, ShardIndex, ShardRecord, index_name, shard_name, write_manifest
from trainer.data.sources import offline_reader
from trainer.data.sources.offline_reader import FETCH_AHEAD


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="2000,100000,1000000", help="data set sizes in groups (default: %(default)s)")
    parser.add_argument("--index-only-above", type=int, default=100_000,
                        help="larger sizes are written as manifest + indexes + sparse tars, no image data")
    parser.add_argument("--images-per-group", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=16, help="stored image side in px (default: %(default)s)")
    parser.add_argument("--shard-size", type=int, default=1000, help="groups per shard (default: %(default)s)")
    parser.add_argument("--read-groups", type=int, default=2000, help="groups read per read-rate measurement")
    parser.add_argument("--repeats", type=int, default=3, help="timings per point, best kept (default: %(default)s)")
    parser.add_argument("--scan", action="store_true", help="also time the first start on tars without indexes")
    parser.add_argument("--no-s3", action="store_true", help="skip the local S3 server measurements")
    parser.add_argument("--store-latency-ms", type=float, default=0.0,
                        help="delay each request to the S3 server by this much (a remote store's round trip)")
    parser.add_argument("--fetch-ahead", default=str(FETCH_AHEAD),
                        help="ranged GETs in flight per worker for the S3 reader, comma-separated (default: %(default)s)")
    parser.add_argument("--workdir", help="where the shard sets go (default: a temp folder, deleted after)")
    parser.add_argument("--quick", action="store_true", help="sizes 200,2000, 200 groups read (tests the code path)")


def _png(value: int, size: int) -> bytes:
    from PIL import Image

    image = np.full((size, size, 3), value % 256, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _config(m: int, size: int):
    from generator_service.config import GeneratorConfig

    return GeneratorConfig(backend="procedural", images_per_group=m, save_size=size)


def write_full_set(root: Path, groups: int, m: int, size: int, shard_size: int) -> None:
    """A real shard set (images, indexes, manifest) through the generator's ShardWriter."""
    from generator_service.shards import ShardWriter
    from protocol import Group

    config = _config(m, size)
    images = [_png(v, size) for v in range(16)]
    with ShardWriter(root, config, shard_size=shard_size) as writer:
        for cid in range(groups):
            writer.write(Group(group_id=f"g{cid:09d}", caption_id=cid, caption=f"caption {cid}", seeds=list(range(m)),
                               encoded=[images[(cid + j) % 16] for j in range(m)], encoding="png",
                               shape=(m, size, size, 3), generator=config.fingerprint(), gen_seconds=0.0))


def write_index_only_set(root: Path, groups: int, m: int, size: int, shard_size: int, group_bytes: int = 4096) -> None:
    """Manifest + shard indexes + sparse tars of the indexed size: what start-up reads, no image data."""
    config = _config(m, size)
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for k, first in enumerate(range(0, groups, shard_size)):
        count = min(shard_size, groups - first)
        starts = np.arange(count, dtype=np.int64) * group_bytes
        ranges = np.stack([starts, starts + group_bytes - 512], axis=1)
        tar_bytes = count * group_bytes + 1024
        with open(root / shard_name(k), "wb") as handle:
            handle.truncate(tar_bytes)  # sparse: takes no disk space
        (root / index_name(shard_name(k))).write_bytes(ShardIndex(tar_bytes, ranges).to_bytes())
        ids = list(range(first, first + count))
        records.append(ShardRecord(shard_name(k), count, count * m, ids, [f"g{c:09d}" for c in ids]))
    info = config.welcome_info()
    write_manifest(root, Manifest(info, info.fingerprint, records, config.to_dict(), {"images_per_group": m}))


def _best(repeats: int, fn) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def time_startup(data: str, m: int, repeats: int) -> tuple[float, int, int]:
    """Best start-up seconds of the offline source on ``data``; groups and index bytes."""
    from trainer.data.sources.offline import OfflineSource

    holder: dict[str, Any] = {}

    def build() -> None:
        holder["source"] = OfflineSource(data, captions_per_rank=1, draw_per_caption=m, num_workers=0)

    seconds = _best(repeats, build)
    index = holder["source"].index
    return seconds, index.count, index.nbytes


def rate_reader(data: str, m: int, groups: int) -> float:
    """Groups/s this reader delivers in one process (global shuffle, one ranged read per group)."""
    from trainer.data.sources.offline import OfflineSource

    source = OfflineSource(data, captions_per_rank=50, draw_per_caption=m, num_workers=0, seed=1)
    source.next_batch()  # warm
    batches = max(1, groups // 50)
    start = time.perf_counter()
    for _ in range(batches):
        source.next_batch()
    return batches * 50 / (time.perf_counter() - start)


def rate_webdataset(urls: list[str], groups: int) -> float:
    """Groups/s of plain webdataset reading and decoding the same shards in order."""
    import webdataset as wds

    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8")
    iterator = iter(dataset)
    next(iterator)
    start = time.perf_counter()
    read = 0
    for _ in range(groups):
        try:
            next(iterator)
        except StopIteration:
            break
        read += 1
    return read / (time.perf_counter() - start)


def _use_fsspec_in_webdataset() -> None:
    """Plain webdataset opens s3:// through fsspec (its documented way to add a URL scheme)."""
    from fsspec.core import url_to_fs
    from webdataset.gopen import gopen_schemes

    def open_fsspec(url, mode="rb", bufsize=8192, **_kw):
        fs, path = url_to_fs(url)
        return fs.open(path, mode, block_size=8 << 20)

    gopen_schemes["s3"] = open_fsspec


def rate_reader_ahead(data: str, m: int, groups: int, ahead: int) -> float:
    """:func:`rate_reader` with ``ahead`` ranged GETs in flight (the reader runs in this process)."""
    saved = offline_reader.FETCH_AHEAD
    offline_reader.FETCH_AHEAD = ahead
    try:
        return rate_reader(data, m, groups)
    finally:
        offline_reader.FETCH_AHEAD = saved


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
def s3_server_process(latency_ms: float = 0.0) -> Iterator[tuple[str, str]]:
    """moto's S3 server in its own process on a free port of 127.0.0.1; yields ``(endpoint the readers
    use, the server's own endpoint)``: with ``latency_ms``, the readers' one is a proxy that delays
    each request by that much (:mod:`benchmarks.latency_proxy`)."""
    port = _free_port()
    with _process_on_port([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port,
                          "moto's S3 server") as direct:
        if not latency_ms:
            yield direct, direct
            return
        proxy_port = _free_port()
        with _process_on_port([sys.executable, "-m", "benchmarks.latency_proxy", str(proxy_port), str(port),
                               str(latency_ms)], proxy_port, "the latency proxy") as delayed:
            yield delayed, direct


def rate_store_gets(url: str, groups: int, ahead: int) -> float:
    """Ranged GETs/s the store answers for the samples of the tar ``url`` (``ahead`` at once, no
    decoding): the most groups/s any reader with one GET per group gets from it."""
    from infra import storage

    ranges = ShardIndex.from_bytes(storage.read_bytes(url + ".idx"), url + ".idx").ranges
    start = time.perf_counter()
    for first in range(0, groups, ahead):
        storage.read_ranges([(url, int(ranges[k % len(ranges)][0]), int(ranges[k % len(ranges)][1]))
                             for k in range(first, min(first + ahead, groups))])
    return groups / (time.perf_counter() - start)


def _s3_rates(local: Path, m: int, groups: int, shards: int, aheads: list[int], repeats: int,
              latency_ms: float = 0.0) -> dict[str, float]:
    """Upload ``local`` to a moto server on 127.0.0.1 and measure both readers from it (best of
    ``repeats`` interleaved runs)."""
    import boto3

    rates: dict[str, float] = {}
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
            _use_fsspec_in_webdataset()
            urls = [f"s3://bench/shards/{shard_name(k)}" for k in range(shards)]
            for _ in range(repeats):
                for ahead in aheads:
                    name = "reader_s3" if ahead == aheads[0] else f"reader_s3_ahead{ahead}"
                    rates[name] = max(rates.get(name, 0.0), rate_reader_ahead("s3://bench/shards", m, groups, ahead))
                rates["webdataset_s3"] = max(rates.get("webdataset_s3", 0.0), rate_webdataset(urls, groups))
                rates["store_gets_s3"] = max(rates.get("store_gets_s3", 0.0), rate_store_gets(urls[0], groups, aheads[0]))
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    return rates


def run_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], str, dict[str, float]]:
    sizes = [200, 2000] if args.quick else [int(s) for s in str(args.sizes).split(",")]
    aheads = [int(a) for a in str(args.fetch_ahead).split(",")]
    if min(aheads) < 1:
        raise ValueError(f"--fetch-ahead must be >= 1, got {args.fetch_ahead}")
    if args.store_latency_ms < 0:
        raise ValueError(f"--store-latency-ms must be >= 0, got {args.store_latency_ms}")
    read_groups = 200 if args.quick else args.read_groups
    m, size, shard_size = args.images_per_group, args.image_size, args.shard_size
    if args.quick:
        shard_size = min(shard_size, 100)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="stablerep-offline-bench-"))
    results: dict[str, Any] = {"sizes": {}, "image_size": size, "images_per_group": m, "shard_size": shard_size}
    try:
        for n in sizes:
            data = root / f"set-{n}"
            index_only = n > args.index_only_above
            if not (data / "manifest.json").exists():
                (write_index_only_set if index_only else write_full_set)(data, n, m, size, shard_size)
            seconds, count, nbytes = time_startup(str(data), m, args.repeats)
            point: dict[str, Any] = {"startup_s": seconds, "groups": count, "index_bytes": nbytes,
                                     "index_bytes_per_group": nbytes / count, "image_data": not index_only}
            if args.scan and not index_only:
                bare = root / f"unindexed-{n}"  # the same tars without their indexes, as img2dataset leaves them
                shutil.rmtree(bare, ignore_errors=True)
                bare.mkdir()
                for tar in data.glob("shard-*.tar"):
                    os.link(tar, bare / tar.name)
                pattern = str(bare / f"shard-{{{0:06d}..{len(list(bare.iterdir())) - 1:06d}}}.tar")
                start = time.perf_counter()
                time_startup(pattern, m, 1)  # scans every tar once, caches the result beside it
                point["first_start_unindexed_s"] = time.perf_counter() - start
                shutil.rmtree(bare)
            results["sizes"][str(n)] = point
        base = str(sizes[0])
        for n in sizes[1:]:
            point = results["sizes"][str(n)]
            point["us_per_group"] = 1e6 * (point["startup_s"] - results["sizes"][base]["startup_s"]) / (n - sizes[0])
            if "first_start_unindexed_s" in point:
                point["unindexed_us_per_group"] = 1e6 * (point["first_start_unindexed_s"] - results["sizes"][base].get(
                    "first_start_unindexed_s", 0.0)) / (n - sizes[0])
        read_set = root / f"set-{sizes[0]}"
        shards = -(-sizes[0] // shard_size)
        urls = [str(read_set / shard_name(k)) for k in range(shards)]
        rates = {"reader_local": 0.0, "webdataset_local": 0.0}
        for _ in range(args.repeats):  # interleaved, best kept: the machine may be shared
            rates["reader_local"] = max(rates["reader_local"], rate_reader(str(read_set), m, read_groups))
            rates["webdataset_local"] = max(rates["webdataset_local"], rate_webdataset(urls, read_groups))
        if not args.no_s3:
            try:
                import moto  # noqa: F401
                import s3fs  # noqa: F401
            except ImportError:
                results["s3_skipped"] = "moto or s3fs not installed (pip install 'stablerep[s3]' 'moto[server]')"
            else:
                rates.update(_s3_rates(read_set, m, read_groups, shards, aheads, args.repeats, args.store_latency_ms))
        results["groups_per_s_one_process"] = rates
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    lines = [f"offline source start-up ({m} images of {size} px per group, {shard_size} groups per shard; "
             "warm page cache)",
             f"{'groups':>10} {'start-up s':>11} {'us/group':>9} {'index B/group':>14} {'unindexed 1st start s':>22} data"]
    for n in sizes:
        p = results["sizes"][str(n)]
        lines.append(f"{n:>10} {p['startup_s']:>11.3f} {p.get('us_per_group', float('nan')):>9.2f} "
                     f"{p['index_bytes_per_group']:>14.1f} {p.get('first_start_unindexed_s', float('nan')):>22.2f} "
                     f"{'images' if p['image_data'] else 'index only'}")
    lines.append(f"groups/s read and decoded by one process ({read_groups} groups of the {sizes[0]}-group set, "
                 f"best of {args.repeats} interleaved runs; S3: moto in its own process on 127.0.0.1, "
                 f"reader_s3 at --fetch-ahead {aheads[0]}):")
    lines += [f"  {name:<18} {value:>10.0f}" for name, value in rates.items()]
    if args.quick:
        lines.append("(--quick: tests the code path; the numbers say nothing about speed)")
    bars = {f"{k} groups/s": v for k, v in rates.items()}
    return results, "\n".join(lines), bars
