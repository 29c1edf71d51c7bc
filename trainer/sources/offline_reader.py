"""Reading offline parts into decoded caption groups (runs inside DataLoader workers).

Sample format, recognized per sample with the WebDataset key convention (key = member name up to
the first dot of its base name, extension = the rest):

- caption group (generator shards): ``KEY.txt``, ``KEY.json`` (holds ``caption_id``), ``KEY.{i}.png``
  (or jpg / jpeg / webp), one per image;
- plain image-text sample (img2dataset): ``KEY.jpg`` (or png / jpeg / webp) + ``KEY.txt``; it becomes a
  group of one image whose caption id is a stable 63-bit hash of KEY (:func:`key_caption_id`), the
  same on every rank and every run;
- official layout row ``i``: ``seed*/<path>`` images, caption id ``i``.

Only the ``n`` images a batch needs are decoded, chosen without replacement; a group with fewer than
``n`` images repeats some, chosen with replacement, and is counted as ``short``. Images whose size
differs from ``image_size`` are resized (shorter side) and center-cropped with PIL.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from protocol.shards import GROUP_IMAGE_PATTERN, IMAGE_EXTENSIONS, split_member
from trainer.images import decode_image
from trainer.sources.offline_layout import OfficialTable, Part, RowsPart, TarPart, describe

log = logging.getLogger("trainer.sources.offline")

_SINGLE_IMAGE = IMAGE_EXTENSIONS


class CorruptSample(Exception):
    """A sample that cannot be turned into a group (the message says why)."""


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
    short: bool  # fewer than n images: some repeated


def key_caption_id(key: str) -> int:
    """Stable caption id of a plain WebDataset sample: the first 63 bits of blake2b(key)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def _read_range(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(size)
    if len(data) != size:
        raise CorruptSample(f"{path}: member at byte {offset} is truncated ({len(data)} of {size} bytes)")
    return data


def _tar_members(path: str) -> tuple[list[tarfile.TarInfo], bool]:
    """Regular-file members of a tar (header scan, no data read) and whether the file is damaged.

    A truncated or damaged tar keeps the members before the damage (as WebDataset readers do)."""
    try:
        with tarfile.open(path, mode="r:") as archive:
            return [m for m in archive.getmembers() if m.isfile()], False
    except (tarfile.TarError, EOFError, OSError):
        pass
    members: list[tarfile.TarInfo] = []
    with open(path, "rb") as handle:
        try:
            with tarfile.open(fileobj=handle, mode="r|") as stream:
                for member in stream:
                    if member.isfile():
                        members.append(member)
        except (tarfile.TarError, EOFError, OSError):
            pass
    size = os.path.getsize(path)
    return [m for m in members if m.offset_data + m.size <= size], True


def tar_samples(part: TarPart) -> tuple[list[RawSample], bool]:
    """Samples of a tar shard in file order, grouped by key, and whether the shard is damaged.

    Raises:
        CorruptSample / OSError: the shard cannot be read at all."""
    members, damaged = _tar_members(part.path)
    if damaged and not members:
        raise CorruptSample(f"{part.path}: not a readable tar file")
    samples: dict[str, RawSample] = {}
    for member in members:
        parts = split_member(member.name)
        if parts is None:
            continue
        key, ext = parts[0], parts[1].lower()
        sample = samples.setdefault(key, RawSample(key, {}))
        sample.files[ext] = lambda p=part.path, o=member.offset_data, s=member.size: _read_range(p, o, s)
    return list(samples.values()), damaged


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


def part_samples(part: Part, tables: list[OfficialTable]) -> tuple[list[RawSample], bool]:
    if isinstance(part, TarPart):
        return tar_samples(part)
    return official_samples(part, tables[part.table]), False


def decode_sample(sample: RawSample, n: int, image_size: int, rng: np.random.Generator) -> DecodedGroup:
    """Turn a raw sample into ``n`` decoded images of one caption (see the module docstring)."""
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
            caption_id = key_caption_id(sample.key)
            caption = files["txt"]().decode("utf-8")
        m = len(image_exts)
        if m >= n:
            chosen = rng.choice(m, size=n, replace=False)
        else:
            chosen = np.concatenate([rng.permutation(m), rng.choice(m, size=n - m, replace=True)])
        images = np.stack([decode_image(files[image_exts[i]](), image_size) for i in chosen])
    except CorruptSample:
        raise
    except Exception as exc:  # undecodable image, bad JSON, bad UTF-8, I/O error
        raise CorruptSample(f"sample {sample.key}: {type(exc).__name__}: {exc}") from exc
    return DecodedGroup(caption_id=caption_id, caption=caption, images=torch.from_numpy(images), short=m < n)


@dataclass
class WorkerItem:
    """What a worker sends the main process: a group (or only counters when ``group`` is None) and
    where in the worker's plan it came from (``part_pos`` = index in the worker's part list,
    ``next_sample`` = position in that part's sample order to continue from)."""

    worker: int
    part_pos: int
    next_sample: int
    group: DecodedGroup | None
    corrupt_groups: int = 0
    corrupt_shards: int = 0
    unreadable_shards: int = 0


def iterate_parts(
    parts: list[Part],
    part_indices: list[int],
    tables: list[OfficialTable],
    *,
    worker: int,
    epoch: int,
    seed: int,
    shuffle: bool,
    n: int,
    image_size: int,
    start: tuple[int, int] = (0, 0),
) -> Iterator[WorkerItem]:
    """Decode the parts ``part_indices`` in order, each in a per-epoch shuffled sample order, starting
    at ``start = (part_pos, next_sample)``. Damaged data is logged, counted and skipped."""
    pending = WorkerItem(worker, 0, 0, None)
    for part_pos, part_index in enumerate(part_indices):
        if part_pos < start[0]:
            continue
        part = parts[part_index]
        first = start[1] if part_pos == start[0] else 0
        try:
            samples, damaged = part_samples(part, tables)
        except Exception as exc:  # noqa: BLE001 - any unreadable part is skipped, never fatal
            log.warning("skipping unreadable %s: %s", describe(part, tables), exc)
            pending.unreadable_shards += 1
            pending.corrupt_shards += 1
            continue
        if damaged:
            log.warning("%s is damaged (truncated?): reading its %d intact samples", describe(part, tables), len(samples))
            pending.corrupt_shards += int(first == 0)
        expected = getattr(part, "expected_groups", None)
        if expected is not None and len(samples) < expected and first == 0:
            pending.corrupt_groups += expected - len(samples)
        order = np.arange(len(samples))
        if shuffle:
            order = np.random.default_rng([seed, epoch, part_index]).permutation(len(samples))
        for k in range(first, len(samples)):
            rng = np.random.default_rng([seed, epoch, part_index, k, 1])
            try:
                group = decode_sample(samples[order[k]], n, image_size, rng)
            except CorruptSample as exc:
                log.warning("skipping corrupt sample in %s: %s", describe(part, tables), exc)
                pending.corrupt_groups += 1
                continue
            pending.part_pos, pending.next_sample, pending.group = part_pos, k + 1, group
            yield pending
            pending = WorkerItem(worker, 0, 0, None)
    yield pending  # the counters gathered after the last group
