"""Reading offline parts into decoded caption groups (runs inside DataLoader workers).

Sample format, recognized per sample with the WebDataset key convention (key = member name up to
the first dot of its base name, extension = the rest):

- caption group (generator shards): ``KEY.txt``, ``KEY.json`` (holds ``caption_id``), ``KEY.{i}.png``
  (or jpg / jpeg / webp), one per image;
- plain image-text sample (img2dataset): ``KEY.jpg`` (or png / jpeg / webp) + ``KEY.txt``; it becomes a
  group of one image whose caption id is a stable 63-bit hash of KEY (:func:`key_caption_id`), the
  same on every rank and every run;
- official layout row ``i``: ``seed*/<path>`` images, caption id ``i``.

With several inputs of different content, ids are namespaced per input (:mod:`trainer.data.sources.caption_ids`).

Only the ``n`` images a batch needs are decoded, chosen without replacement; a group with fewer than
``n`` images is refused (:class:`ShortGroup`: it would pair an image with itself as a positive), as the
online source refuses it. Images whose size
differs from ``image_size`` are resized (shorter side) and center-cropped with PIL.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from protocol.shards import GROUP_IMAGE_PATTERN, IMAGE_EXTENSIONS
from infra import storage
from infra.signed_ranges import SignedRanges
from infra.storage import StorageError
from trainer.data.images import decode_image
from trainer.data.sources.caption_ids import namespaced_caption_id, needs_namespacing
from trainer.data.sources.offline_index import SampleIndex, parse_sample, read_tar_sample
from trainer.data.sources.offline_layout import OfficialTable, Part, RowsPart, TarPart, describe, part_namespace

log = logging.getLogger("trainer.data.sources.offline")

_SINGLE_IMAGE = IMAGE_EXTENSIONS


class CorruptSample(Exception):
    """A sample that cannot be turned into a group (the message says why)."""


class ShortGroup(Exception):
    """A group with fewer images than the draw (the message says how many)."""


@dataclass
class RawSample:
    """Lazily readable members of one sample: ``files[ext]()`` returns the member's bytes."""

    key: str
    files: dict[str, Callable[[], bytes]]


@dataclass
class DecodedGroup:
    caption_id: int
    caption: str
    images: torch.Tensor  # uint8 [n, S, S, 3]; a tensor so DataLoader workers pass it by shared memory


def key_caption_id(key: str) -> int:
    """Stable caption id of a plain WebDataset sample: the first 63 bits of blake2b(key)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def official_samples(part: RowsPart, table: OfficialTable) -> list[RawSample]:
    """Rows of the official layout as samples whose files are ``{index}.{ext}`` per seed folder."""

    def reader(path: str) -> Callable[[], bytes]:
        def read() -> bytes:
            with open(path, "rb") as handle:
                return handle.read()

        return read

    samples = []
    for row in range(part.start, part.stop):
        relative, caption = table.rows[row]
        ext = relative.rsplit(".", 1)[-1].lower()
        files: dict[str, Callable[[], bytes]] = {
            "txt": lambda c=caption: c.encode("utf-8"),
            "row": lambda r=row: str(r).encode(),
        }
        index = 0
        for seed_dir in table.seed_dirs:
            path = os.path.join(seed_dir, relative)
            if os.path.isfile(path):
                files[f"{index}.{ext}"] = reader(path)
                index += 1
        samples.append(RawSample(key=relative, files=files))
    return samples


def decode_sample(sample: RawSample, n: int, image_size: int, rng: np.random.Generator,
                  namespace: str | None = None) -> DecodedGroup:
    """Turn a raw sample into ``n`` decoded images of one caption (see the module docstring).

    ``namespace``: when set, the caption id becomes ``namespaced_caption_id(namespace, local id)`` (runs
    with several inputs, see :mod:`trainer.data.sources.caption_ids`)."""
    files = sample.files
    group_images = sorted(
        ((int(m.group(1)), ext) for ext in files if (m := GROUP_IMAGE_PATTERN.match(ext))), key=lambda item: item[0]
    )
    try:
        if group_images:
            if "row" in files:  # official layout
                caption_id = int(files["row"]().decode())
                caption = files["txt"]().decode("utf-8")
            else:
                if "json" not in files:
                    raise CorruptSample(f"sample {sample.key}: group images without {sample.key}.json")
                header = json.loads(files["json"]())
                caption_id = int(header["caption_id"])
                caption = files["txt"]().decode("utf-8") if "txt" in files else str(header["caption"])
                expected = (header.get("shape") or [len(group_images)])[0]
                if len(group_images) < int(expected):
                    raise CorruptSample(f"sample {sample.key}: {len(group_images)} of {expected} images present")
            image_exts = [ext for _, ext in group_images]
        else:
            image_exts = [ext for ext in _SINGLE_IMAGE if ext in files][:1]
            if not image_exts:
                raise CorruptSample(f"sample {sample.key}: no image member (has {sorted(files)})")
            if "txt" not in files:
                raise CorruptSample(f"sample {sample.key}: no {sample.key}.txt caption")
            caption_id = key_caption_id(sample.key) if namespace is None else namespaced_caption_id(namespace, sample.key)
            caption = files["txt"]().decode("utf-8")
        m = len(image_exts)
        if m < n:
            raise ShortGroup(f"sample {sample.key}: {m} image(s), fewer than the {n} drawn per caption")
        chosen = rng.choice(m, size=n, replace=False)
        images = np.stack([decode_image(files[image_exts[i]](), image_size) for i in chosen])
    except (CorruptSample, ShortGroup):
        raise
    except Exception as exc:  # undecodable image, bad JSON, bad UTF-8, I/O error
        raise CorruptSample(f"sample {sample.key}: {type(exc).__name__}: {exc}") from exc
    if namespace is not None and group_images:
        caption_id = namespaced_caption_id(namespace, caption_id)
    return DecodedGroup(caption_id=caption_id, caption=caption, images=torch.from_numpy(images))


@dataclass
class WorkerItem:
    """What a worker sends the main process for each sample of its plan, in order: the group, or
    ``None`` for a sample skipped as corrupt (``short`` False) or with too few images (``short`` True)."""

    worker: int
    group: DecodedGroup | None
    short: bool = False


def raw_sample(g: int, index: SampleIndex, parts: Sequence[Part], tables: Sequence[OfficialTable],
               fetched: bytes | BaseException | None = None) -> RawSample:
    """Global sample ``g`` as a :class:`RawSample` (one ``pread`` for a tar sample, or its bytes
    ``fetched`` already, see :class:`PlanFetcher`)."""
    p, k = index.locate(g)
    part = parts[p]
    if isinstance(part, RowsPart):
        row = part.start + k
        return official_samples(RowsPart(part.table, row, row + 1), tables[part.table])[0]
    start, end = index.byte_range(g)
    if fetched is None:
        key, files = read_tar_sample(part.path, int(start), int(end))
    elif isinstance(fetched, BaseException):  # deleted or unreadable in the store: counted and skipped
        raise OSError(f"{part.path}: {storage.describe_failure(fetched)}")
    elif len(fetched) != end - start:
        raise OSError(f"{part.path}: sample at byte {start} is truncated ({len(fetched)} of {end - start} bytes)")
    else:
        key, files = parse_sample(fetched)
    return RawSample(key, files)


#: Remote samples a worker fetches at once (one ranged GET each, concurrently): an object store's
#: latency is paid once per chunk, not once per group. The next chunk is fetched while this one is
#: decoded, so a worker holds at most two chunks. 1 = one GET at a time (``--fetch-ahead``).
FETCH_AHEAD = 32


def fetch_remote(samples: Sequence[int], index: SampleIndex, parts: Sequence[Part],
                 reader: SignedRanges | None = None) -> dict[int, bytes | BaseException]:
    """The bytes of the tar samples among ``samples`` that live in an object store, fetched concurrently
    (by ``reader``; ``None``: through the filesystem, :func:`infra.storage.read_ranges`)."""
    wanted = []
    for g in samples:
        part = parts[index.locate(g)[0]]
        if isinstance(part, TarPart) and storage.is_remote(part.path):
            wanted.append((g, part.path, *index.byte_range(g)))
    if not wanted:
        return {}
    ranges = [(path, int(start), int(end)) for _, path, start, end in wanted]
    try:
        found = reader.read(ranges) if reader is not None else storage.read_ranges(ranges)
    except Exception as exc:  # noqa: BLE001 - the store failed as a whole: every sample of the chunk reports it
        return {g: exc for g, *_ in wanted}
    return {g: data for (g, *_), data in zip(wanted, found)}


class PlanFetcher:
    """The remote tar samples of one worker's plan, fetched in chunks of ``ahead`` plan positions
    (:func:`fetch_remote`); the chunk after the one being decoded is fetched on a thread meanwhile.
    ``direct_gets``: the GETs go straight to the store over signed URLs (:mod:`infra.signed_ranges`)."""

    def __init__(self, order: Sequence[int], index: SampleIndex, parts: Sequence[Part], ahead: int,
                 direct_gets: bool = True) -> None:
        self.order, self.index, self.parts = order, index, parts
        self.ahead = max(1, int(ahead))
        self.reader = SignedRanges(self.ahead, enabled=direct_gets)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="offline-fetch")
        self.started: dict[int, Future] = {}  # chunk number -> its fetch
        self.chunk, self.fetched = -1, {}  # the chunk being decoded and its bytes by sample

    def _start(self, chunk: int) -> None:
        first = chunk * self.ahead
        if first < len(self.order) and chunk not in self.started:
            samples = self.order[first : first + self.ahead]
            self.started[chunk] = self.pool.submit(fetch_remote, samples, self.index, self.parts, self.reader)

    def take(self, position: int) -> bytes | BaseException | None:
        """The bytes of the sample at plan ``position`` (its exception if the GET failed), or ``None``
        for a local sample."""
        chunk = position // self.ahead
        if chunk != self.chunk:
            self._start(chunk)
            self._start(chunk + 1)
            self.chunk, self.fetched = chunk, self.started.pop(chunk).result()
        return self.fetched.pop(self.order[position], None)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.started.clear()
        self.reader.close()


def iterate_samples(
    samples: np.ndarray,
    index: SampleIndex,
    parts: Sequence[Part],
    tables: Sequence[OfficialTable],
    *,
    worker: int,
    epoch: int,
    seed: int,
    n: int,
    image_size: int,
    fetch_ahead: int | None = None,
    direct_gets: bool = True,
) -> Iterator[WorkerItem]:
    """Decode the global samples ``samples`` in order, one :class:`WorkerItem` each (a skipped sample
    is logged and sent as ``group=None``, so the main process counts every position it was given).

    Samples in an object store are fetched ``fetch_ahead`` at a time, a chunk ahead (:class:`PlanFetcher`;
    ``None``: :data:`FETCH_AHEAD`), straight from the store over signed URLs unless ``direct_gets`` is
    False; local ones are read with one ``pread`` when decoded."""
    namespaced = needs_namespacing(part_namespace(p, tables) for p in parts)
    order = samples.tolist()
    ahead = FETCH_AHEAD if fetch_ahead is None else fetch_ahead
    remote = any(isinstance(p, TarPart) and storage.is_remote(p.path) for p in parts)
    fetcher = PlanFetcher(order, index, parts, ahead, direct_gets) if remote else None
    try:
        yield from _decode_in_order(order, index, parts, tables, fetcher, worker=worker, epoch=epoch, seed=seed,
                                    n=n, image_size=image_size, namespaced=namespaced)
    finally:
        if fetcher is not None:
            fetcher.close()


def _decode_in_order(order: list[int], index: SampleIndex, parts: Sequence[Part], tables: Sequence[OfficialTable],
                     fetcher: PlanFetcher | None, *, worker: int, epoch: int, seed: int, n: int, image_size: int,
                     namespaced: bool) -> Iterator[WorkerItem]:
    warned_short = False
    for i, g in enumerate(order):
        part = parts[index.locate(g)[0]]
        rng = np.random.default_rng([seed, epoch, g, 1])
        try:
            try:
                sample = raw_sample(g, index, parts, tables, fetcher.take(i) if fetcher is not None else None)
            except (OSError, tarfile.TarError, StorageError) as exc:
                raise CorruptSample(f"sample {g}: {type(exc).__name__}: {exc}") from exc
            group = decode_sample(sample, n, image_size, rng, part_namespace(part, tables) if namespaced else None)
        except CorruptSample as exc:
            log.warning("skipping corrupt sample in %s: %s", describe(part, tables), exc)
            yield WorkerItem(worker, None)
            continue
        except ShortGroup as exc:
            if not warned_short:
                log.warning("skipping groups with too few images in %s (counted in skipped_short): %s",
                            describe(part, tables), exc)
                warned_short = True
            yield WorkerItem(worker, None, short=True)
            continue
        yield WorkerItem(worker, group)
