"""Global sample index of the offline inputs: every caption group gets one number ``g``.

Built once per process before training (:func:`build_index`). Official-layout rows need nothing
more than their count. A tar shard's samples (runs of members with one WebDataset key) are byte
ranges ``[start, end)``, taken from its sample index (``shard-N.tar.idx``, :class:`protocol.shards.ShardIndex`):

- the shard writer commits one with every shard, so a generator shard set is never scanned;
- a tar without one (img2dataset output, older shard sets) is scanned once (member headers only,
  no image data) and the result cached beside it, or in ``index_cache`` when given (e.g. for a
  read-only folder); the cache records the tar's size and mtime (ETag in an object store), and a
  cache that no longer matches, or is corrupt, is refused with a warning naming it and rebuilt.

The index of all samples is held as two flat arrays (int64 start, uint32 length: 12 bytes per group
per process, :attr:`SampleIndex.nbytes`). A DataLoader worker reads sample ``g`` with one ranged
read (a ``pread`` locally, one ranged GET from an object store) and parses it as a small tar
(:func:`read_tar_sample`), so any permutation of all samples can be read: the epoch shuffle is global,
at sample level (``trainer.data.sources.offline``).

Damage is found here, once: shards that cannot be read, truncated shards (their intact samples stay)
and groups a manifest lists but a shard lost are counted in :attr:`SampleIndex.problems`.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from infra import storage
from protocol.shards import ShardIndex, ShardLayoutError, index_name, scan_ranges, split_member
from trainer.data.sources.caption_ids import text_digest
from trainer.data.sources.offline_layout import (
    OfficialTable,
    Part,
    RowsPart,
    TarPart,
    describe,
    part_namespace,
    resolve_data,
)

log = logging.getLogger("trainer.data.sources.offline")

MAX_SAMPLE_BYTES = 2**32 - 1  # lengths are stored as uint32


@dataclass
class SampleIndex:
    """``offsets[p]`` = global number of the first sample of part ``p`` (``len(parts) + 1`` entries);
    ``starts[g]`` / ``lengths[g]`` = byte range of tar sample ``g`` (zeros for CSV rows)."""

    offsets: np.ndarray  # int64 [parts + 1]
    starts: np.ndarray  # int64 [N]
    lengths: np.ndarray  # uint32 [N]
    problems: dict[str, int] = field(default_factory=lambda: {"lost_groups": 0, "damaged_shards": 0,
                                                              "unreadable_shards": 0})

    @property
    def num_samples(self) -> int:
        return int(self.offsets[-1])

    @property
    def count(self) -> int:
        """Number of caption groups (samples) of the data set: what one epoch reads."""
        return self.num_samples

    @property
    def nbytes(self) -> int:
        """Memory of the index arrays."""
        return int(self.offsets.nbytes + self.starts.nbytes + self.lengths.nbytes)

    def locate(self, g: int) -> tuple[int, int]:
        """``(part index, sample index inside the part)`` of global sample ``g``."""
        part = int(np.searchsorted(self.offsets, g, side="right")) - 1
        return part, int(g - self.offsets[part])

    def byte_range(self, g: int) -> tuple[int, int]:
        """``[start, end)`` of tar sample ``g`` inside its shard."""
        start = int(self.starts[g])
        return start, start + int(self.lengths[g])


def _scan_tar(path: str, size: int) -> tuple[np.ndarray, bool]:
    """Byte ranges ``[start, end)`` of the samples of a tar (header scan) and whether it is damaged."""
    local = storage.local_path(path)
    if local is not None:
        handle = open(local, "rb")
    else:
        fs, inner = storage.filesystem(path)
        handle = fs.open(inner, "rb", block_size=8 << 20)
    with handle:
        try:
            return scan_ranges(handle, size)
        except OSError as exc:
            raise OSError(f"{path}: {exc}") from None


def cache_name(path: str) -> str:
    """File name of the scan cache of tar ``path`` inside an ``index_cache`` folder."""
    where = path if storage.is_remote(path) else os.path.realpath(path)
    digest = hashlib.sha256(where.encode("utf-8")).hexdigest()[:24]
    return f"{digest}-{index_name(os.path.basename(path.rstrip('/')))}"


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if storage.is_remote(path) else (os.path.dirname(path) or ".")


class _IndexLoader:
    """Finds, checks, builds and caches the :class:`ShardIndex` of each tar part."""

    def __init__(self, index_cache: str | None) -> None:
        self.index_cache = index_cache
        self._listings: dict[str, dict[str, tuple[int, str]] | None] = {}
        self._cache_warned = False

    def listing(self, directory: str) -> dict[str, tuple[int, str]] | None:
        """Files of ``directory`` (one LIST per folder), or ``None`` where the store cannot list
        (e.g. plain http): then each file is asked for on its own."""
        if directory not in self._listings:
            try:
                self._listings[directory] = storage.list_names(directory)
            except Exception as exc:  # noqa: BLE001 - no listing: fall back to one request per file
                log.debug("cannot list %s (%s): asking for each file", directory, exc)
                self._listings[directory] = None
        return self._listings[directory]

    def _identity(self, path: str) -> tuple[int, str] | None:
        entries = self.listing(_parent(path))
        if entries:
            return entries.get(os.path.basename(path))
        try:
            return storage.file_identity(path)
        except Exception:  # noqa: BLE001 - missing or unreachable: counted as an unreadable shard
            return None

    def _has(self, directory: str, name: str) -> bool:
        """Whether ``directory/name`` may exist (always worth a try where the folder cannot be listed)."""
        entries = self.listing(directory)
        return not entries or name in entries

    def load(self, paths: list[str]) -> dict[str, ShardIndex | BaseException]:
        """The index of every tar in ``paths`` (an exception where the tar cannot be read)."""
        identities: dict[str, tuple[int, str]] = {}
        candidates: dict[str, list[str]] = {}
        for path in paths:
            found = self._identity(path)
            if found is None:
                continue
            identities[path] = found
            options = []
            if self.index_cache and self._has(self.index_cache, cache_name(path)):
                options.append(storage.join(self.index_cache, cache_name(path)))
            if self._has(_parent(path), index_name(os.path.basename(path))):
                options.append(path + ".idx")
            candidates[path] = options
        blobs = storage.read_many([c for options in candidates.values() for c in options])
        out: dict[str, ShardIndex | BaseException] = {}
        for path in paths:
            if path not in identities:
                out[path] = FileNotFoundError(f"{path}: shard not found")
                continue
            size, identity = identities[path]
            for candidate in candidates[path]:
                problem = ""
                blob = blobs.get(candidate)
                if isinstance(blob, FileNotFoundError) or blob is None:
                    continue  # no index there (a folder that could not be listed)
                if isinstance(blob, BaseException):
                    problem = f"{candidate}: unreadable ({type(blob).__name__}: {blob})"
                else:
                    try:
                        index = ShardIndex.from_bytes(bytes(blob), candidate)
                    except ShardLayoutError as exc:
                        problem = str(exc)
                    else:
                        if index.tar_bytes != size:
                            problem = f"{candidate}: index of a {index.tar_bytes}-byte tar, {path} has {size} bytes"
                        elif index.identity and index.identity != identity:
                            problem = f"{candidate}: cached for {index.identity}, {path} is now {identity}"
                        else:
                            out[path] = index
                            break
                log.warning("stale or corrupt shard index refused, rebuilding it by a scan: %s", problem)
            if path not in out:
                out[path] = self.scan(path, size, identity)
        return out

    def scan(self, path: str, size: int, identity: str) -> ShardIndex | BaseException:
        try:
            ranges, damaged = _scan_tar(path, size)
        except (OSError, storage.StorageError) as exc:
            return exc
        index = ShardIndex(size, ranges, identity, damaged)
        target = storage.join(self.index_cache, cache_name(path)) if self.index_cache else path + ".idx"
        try:
            storage.write_bytes(target, index.to_bytes())
        except Exception as exc:  # noqa: BLE001 - a read-only folder or bucket: work without the cache
            if not self._cache_warned:
                log.warning("cannot cache the index of %s at %s (%s: %s); pass --index-cache DIR to keep scans",
                            path, target, type(exc).__name__, exc)
                self._cache_warned = True
        return index


def build_index(parts: Sequence[Part], tables: Sequence[OfficialTable], index_cache: str | None = None) -> SampleIndex:
    """The global index of ``parts``; see the module docstring."""
    tar_paths = [part.path for part in parts if isinstance(part, TarPart)]
    if index_cache and not storage.is_remote(index_cache):
        os.makedirs(index_cache, exist_ok=True)
    indexes = _IndexLoader(index_cache).load(tar_paths) if tar_paths else {}
    counts: list[int] = []
    starts: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    problems = {"lost_groups": 0, "damaged_shards": 0, "unreadable_shards": 0}
    for part in parts:
        if isinstance(part, RowsPart):
            counts.append(part.stop - part.start)
            starts.append(np.zeros(part.stop - part.start, dtype=np.int64))
            lengths.append(np.zeros(part.stop - part.start, dtype=np.uint32))
            continue
        index = indexes[part.path]
        if isinstance(index, BaseException):
            log.warning("skipping unreadable %s: %s", describe(part, tables), index)
            problems["unreadable_shards"] += 1
            ranges = np.zeros((0, 2), dtype=np.int64)
        else:
            ranges = index.ranges
            if index.damaged:
                log.warning("%s is damaged (truncated?): reading its %d intact samples", part.path, len(ranges))
                problems["damaged_shards"] += 1
        if part.expected_groups is not None and len(ranges) < part.expected_groups:
            problems["lost_groups"] += part.expected_groups - len(ranges)
        sizes = ranges[:, 1] - ranges[:, 0]
        if len(sizes) and int(sizes.max()) > MAX_SAMPLE_BYTES:
            raise ValueError(f"{part.path}: a sample of {int(sizes.max())} bytes (at most 4 GiB per caption group)")
        counts.append(len(ranges))
        starts.append(ranges[:, 0].astype(np.int64))
        lengths.append(sizes.astype(np.uint32))
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
    flat_starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
    flat_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.uint32)
    return SampleIndex(offsets, flat_starts, flat_lengths, problems)


def count_groups(paths: str | Sequence[str], *, seed_dirs: Sequence[str] | None = None,
                 index_cache: str | None = None) -> int:
    """Number of caption groups of an offline data set (``--data`` entries), from the shard indexes:
    no tar is scanned when the writer indexed it (or a scan cache exists)."""
    resolved = resolve_data(paths, seed_dirs=seed_dirs)
    return build_index(resolved.parts, resolved.tables, index_cache).count


def data_fingerprint(parts: Sequence[Part], tables: Sequence[OfficialTable], num_samples: int) -> str:
    """The identity of a data set as a resume state records it: its caption-id namespaces and size."""
    return text_digest(sorted({part_namespace(p, tables) for p in parts}) + [str(num_samples)])


def data_identity(paths: str | Sequence[str], *, seed_dirs: Sequence[str] | None = None,
                  index_cache: str | None = None) -> dict[str, int | str]:
    """``{"num_samples", "data_fingerprint"}`` of an offline data set, as the offline source's
    ``state_dict()`` records them; from manifests and shard indexes (as :func:`count_groups`)."""
    resolved = resolve_data(paths, seed_dirs=seed_dirs)
    count = build_index(resolved.parts, resolved.tables, index_cache).num_samples
    return {"num_samples": count, "data_fingerprint": data_fingerprint(resolved.parts, resolved.tables, count)}


def read_tar_sample(path: str, start: int, end: int) -> tuple[str, dict[str, Callable[[], bytes]]]:
    """The members of the sample stored at bytes ``[start, end)`` of ``path`` (one ranged read):
    ``(key, {ext: bytes getter})``."""
    data = storage.read_bytes(path, start, end)
    if len(data) != end - start:
        raise OSError(f"{path}: sample at byte {start} is truncated ({len(data)} of {end - start} bytes)")
    return parse_sample(data)


#: Plain-file type flags of a USTAR header; any other entry (pax / GNU long names, links) goes to tarfile.
_PLAIN_TYPES = (b"0", b"\0")


def parse_sample(data: bytes) -> tuple[str, dict[str, Callable[[], bytes]]]:
    """Members of one sample's bytes (a run of tar members): ``(key, {ext: bytes getter})``.

    Plain USTAR members (what the shard writer, webdataset and img2dataset write) are read straight
    from their 512-byte headers; opening a ``tarfile`` per sample costs about as much as decoding its
    images. Anything else (pax or GNU long-name headers, links) is read by :mod:`tarfile`."""
    files: dict[str, Callable[[], bytes]] = {}
    key = ""
    offset, block = 0, tarfile.BLOCKSIZE
    while offset + block <= len(data):
        header = data[offset : offset + block]
        if header[257:262] != b"ustar" or header[156:157] not in _PLAIN_TYPES or header[124] & 0x80:
            if not header.strip(b"\0"):
                break
            return _parse_with_tarfile(data)
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]
        try:
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            text = ((prefix + b"/" + name) if prefix else name).decode("utf-8")
        except ValueError as exc:
            raise tarfile.ReadError(f"bad tar header at byte {offset} of the sample: {exc}") from None
        payload_start = offset + block
        if payload_start + size > len(data):
            raise tarfile.ReadError(f"member {text} runs past the end of the sample")
        parts = split_member(text)
        if parts is not None:
            key = parts[0]
            payload = data[payload_start : payload_start + size]
            files[parts[1].lower()] = lambda b=payload: b
        offset = payload_start + size + (-size % block)
    return key, files


def _parse_with_tarfile(data: bytes) -> tuple[str, dict[str, Callable[[], bytes]]]:
    data += bytes(-len(data) % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE)  # block padding + end-of-archive
    files: dict[str, Callable[[], bytes]] = {}
    key = ""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as stream:
        for member in stream:
            parts = split_member(member.name) if member.isfile() else None
            if parts is None:
                continue
            key = parts[0]
            payload = stream.extractfile(member).read()  # type: ignore[union-attr]
            files[parts[1].lower()] = lambda b=payload: b
    return key, files
