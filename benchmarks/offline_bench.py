"""``stablerep-bench offline``: start-up and read rate of the offline source at lab scale.

Measures, on shard sets written here (tiny images, so disk and time stay small):

- **start-up**: seconds to build the offline source (read the manifest and the shard indexes, build
  the global index) at each ``--sizes`` point, and the marginal cost per group between the smallest
  and each larger point. Points above ``--index-only-above`` groups are written *without image
  data*: a manifest, real shard indexes and sparse tars of the indexed size (the start-up path reads
  nothing else). With ``--scan``, the first start on the same tars without indexes (the scan-once
  path, which then caches) is timed too.
- **index memory**: bytes of the in-memory index per group.
- **read rate**: groups/s read and decoded by one DataLoader worker's code (one process, no batching:
  the batch is stacked in the training process), from local disk, from a local HTTP store that answers
  ranged GETs in proportion to the range as object stores do (:mod:`benchmarks.range_server`) and,
  when moto is installed, from a local S3 server (moto on 127.0.0.1; it builds the whole object for
  every ranged GET, so its cost per GET grows with the shard), by this reader (global shuffle, one ranged read per group) and
  by plain ``webdataset`` reading the same shards in order (its usual use; S3 through an fsspec
  opener), on each ``--read-sets`` shard set: by default the tiny groups of the start-up sets (2 images
  of 16 px: the per-request cost shows) and the paper's group shape (10 images of 256 px with
  procedural content, the generator's embedded default: decoding dominates, as it does at CC12M). The
  stores run in their own processes, as stores do; ``--store-latency-ms`` puts a delaying proxy in front of both; the reader is timed with direct GETs over signed
  URLs (``reader_s3``, :mod:`infra.signed_ranges`) and through the filesystem's client
  (``reader_s3_fs``, ``--no-direct-gets``), at each ``--fetch-ahead`` (ranged GETs a worker keeps in
  flight); ``store_gets_s3`` is the ranged GETs/s the server answers without any decoding (the
  ceiling of a reader with one GET per group). ``cpu_ms_per_group`` is the reader process's CPU time
  per group (all its threads): what a worker costs when the store runs elsewhere.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.offline_read_rate import (http_rates, local_rates, ratios, s3_rates, set_images, store_rates,
                                          write_group_set)
from protocol.shards import Manifest, ShardIndex, ShardRecord, index_name, shard_name, write_manifest
from trainer.data.sources.offline_reader import FETCH_AHEAD


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="2000,100000,1000000", help="data set sizes in groups (default: %(default)s)")
    parser.add_argument("--index-only-above", type=int, default=100_000,
                        help="larger sizes are written as manifest + indexes + sparse tars, no image data")
    parser.add_argument("--images-per-group", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=16, help="stored image side in px (default: %(default)s)")
    parser.add_argument("--shard-size", type=int, default=1000, help="groups per shard (default: %(default)s)")
    parser.add_argument("--read-sets", default="2x16:2000,10x256:300",
                        help="read-rate shard sets, IMAGESxPX:GROUPS each, comma-separated (default: %(default)s); "
                             "2x16 with the start-up sets' size is read from the smallest start-up set")
    parser.add_argument("--read-content", choices=("procedural", "flat"), default="procedural",
                        help="images of the read-rate sets: procedural renders (the embedded default's) or one flat "
                             "colour each (decodes far faster than any real image)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per point, best kept (default: %(default)s)")
    parser.add_argument("--scan", action="store_true", help="also time the first start on tars without indexes")
    parser.add_argument("--no-s3", action="store_true", help="skip the local S3 server measurements")
    parser.add_argument("--store-url", metavar="URL",
                        help="also read the read sets from this object store prefix (e.g. s3://bucket/bench; "
                             "credentials and endpoint from the usual environment), uploaded there once")
    parser.add_argument("--store-latency-ms", type=float, default=0.0,
                        help="delay each request to the S3 server by this much (a remote store's round trip)")
    parser.add_argument("--fetch-ahead", default=str(FETCH_AHEAD),
                        help="ranged GETs in flight per worker for the S3 reader, comma-separated (default: %(default)s)")
    parser.add_argument("--workdir", help="where the shard sets go (default: a temp folder, deleted after)")
    parser.add_argument("--quick", action="store_true", help="sizes 200,2000, 200 groups read (tests the code path)")


def _config(m: int, size: int) -> Any:
    from generator_service.config import GeneratorConfig

    return GeneratorConfig(backend="procedural", images_per_group=m, save_size=size)


def write_full_set(root: Path, groups: int, m: int, size: int, shard_size: int) -> None:
    """A real shard set (flat-colour images, indexes, manifest) through the generator's ShardWriter."""
    write_group_set(root, groups, m, size, shard_size, set_images("flat", size))


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


@dataclass(frozen=True)
class ReadSet:
    """A read-rate shard set: ``groups`` groups of ``images`` PNGs of ``px`` px."""

    images: int
    px: int
    groups: int

    @property
    def name(self) -> str:
        return f"{self.images}x{self.px}"


READ_SET = re.compile(r"^(\d+)x(\d+):(\d+)$")


def parse_read_sets(text: str) -> list[ReadSet]:
    """``--read-sets``: ``IMAGESxPX:GROUPS`` entries, comma-separated."""
    sets = []
    for entry in str(text).split(","):
        match = READ_SET.match(entry.strip())
        if match is None or min(int(v) for v in match.groups()) < 1:
            raise ValueError(f"--read-sets: {entry.strip()!r} is not IMAGESxPX:GROUPS with numbers >= 1")
        sets.append(ReadSet(*(int(v) for v in match.groups())))
    return sets


def _read_set_rates(spec: ReadSet, root: Path, smallest: int, m: int, size: int, shard_size: int, aheads: list[int],
                    args: argparse.Namespace) -> dict[str, Any]:
    """Both readers' rates on one read set (the smallest start-up set when it has the same shape and
    enough groups, else a set written for it)."""
    folder = root / f"set-{smallest}"
    content = "flat"
    if (spec.images, spec.px) != (m, size) or spec.groups > smallest:
        content = args.read_content
        folder = root / f"read-{spec.name}-{content}-{spec.groups}"
        if not (folder / "manifest.json").exists():
            write_group_set(folder, spec.groups, spec.images, spec.px, shard_size, set_images(content, spec.px))
    shards = len(list(folder.glob("shard-*.tar")))
    rates, cpu = local_rates(folder, spec.images, spec.groups, shards, args.repeats)
    point: dict[str, Any] = {"groups": spec.groups, "images": spec.images, "px": spec.px, "content": content}
    measured = [http_rates(folder, spec.images, spec.groups, shards, aheads[0], args.repeats, args.store_latency_ms)]
    if not args.no_s3:
        try:
            import moto  # noqa: F401
            import s3fs  # noqa: F401
        except ImportError:
            point["s3_skipped"] = "moto or s3fs not installed (pip install 'stablerep[s3]' 'moto[server]')"
        else:
            measured.append(s3_rates(folder, spec.images, spec.groups, shards, aheads, args.repeats, args.store_latency_ms))
    if args.store_url:
        measured.append(store_rates(folder, args.store_url, spec.images, spec.groups, shards, aheads[0], args.repeats))
    for store_groups_per_s, store_cpu in measured:
        rates.update(store_groups_per_s)
        cpu.update(store_cpu)
    point.update(groups_per_s=rates, cpu_ms_per_group=cpu, ratios=ratios(rates))
    return point


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


def run_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], str, dict[str, float]]:
    sizes = [200, 2000] if args.quick else [int(s) for s in str(args.sizes).split(",")]
    aheads = [int(a) for a in str(args.fetch_ahead).split(",")]
    if min(aheads) < 1:
        raise ValueError(f"--fetch-ahead must be >= 1, got {args.fetch_ahead}")
    if args.store_latency_ms < 0:
        raise ValueError(f"--store-latency-ms must be >= 0, got {args.store_latency_ms}")
    read_sets = parse_read_sets("2x16:200" if args.quick else args.read_sets)
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
        results["read_sets"] = {}
        for spec in read_sets:
            results["read_sets"][spec.name] = _read_set_rates(spec, root, sizes[0], m, size, shard_size, aheads, args)
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
    bars = {}
    for name, point in results["read_sets"].items():
        rates, cpu = point["groups_per_s"], point["cpu_ms_per_group"]
        lines.append(f"groups/s read and decoded by one worker, set {name} ({point['groups']} groups of {point['images']} "
                     f"{point['content']} PNGs of {point['px']} px; best of {args.repeats} interleaved runs; stores in their "
                     f"own processes on 127.0.0.1{'' if args.no_s3 else ' (s3: moto)'}"
                     f"{f', store: {args.store_url}' if args.store_url else ''}; --fetch-ahead {aheads[0]}):")
        lines += [f"  {k:<22} {v:>8.0f} groups/s" + (f"  {cpu[k]:6.2f} CPU ms/group" if k in cpu else "")
                  for k, v in rates.items()]
        lines += [f"  this reader / webdataset, {store}: {ratio:.2f}x" for store, ratio in point["ratios"].items()]
        bars.update({f"{name} {k}": v for k, v in rates.items()})
    if args.quick:
        lines.append("(--quick: tests the code path; the numbers say nothing about speed)")
    return results, "\n".join(lines), bars
