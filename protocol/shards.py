"""The offline shard layout: the second contract between generator and trainer, defined once.

A shard directory holds:

- ``shard-{index:06d}.tar``: WebDataset-compatible tar files, one sample per caption group. The
  sample key is the ``group_id`` (no ``.`` or ``/``); members are ``KEY.txt`` (caption, UTF-8),
  ``KEY.json`` (the group's protocol header fields, ``Group.header_fields()``, with ``encoding`` =
  the stored image format) and ``KEY.{j}.{ext}`` for image ``j = 0 .. m-1`` (``ext`` png, jpg or webp).
- ``.shard-{index:06d}.tar.tmp`` (``.tar.idx.tmp``): a shard (its index) being written; renamed when complete, so a listed or
  renamed shard is never torn.
- ``shard-{index:06d}.tar.idx``: the shard's sample index (:class:`ShardIndex`): the byte range of
  every sample, so a reader finds any group without scanning the tar. Written and renamed into place
  before its shard, so every listed shard has one; a reader checks it against the tar's size.
- ``manifest.json``: the complete shards (:class:`Manifest`), rewritten atomically after each one.
  It is the commit point: a shard (and its index) counts only once the manifest lists it.

A tar without an index (img2dataset output, shard sets written before indexes existed) is scanned
once by the reader, which caches the result in the same format, keyed by the tar's size and mtime
(or object-store ETag) in ``ShardIndex.identity``.

The key rule is WebDataset's: a member's key is its name up to the first dot of its base name, its
extension the rest (``KEY.3.png`` -> key ``KEY``, extension ``3.png``).
"""
from __future__ import annotations

import json
import os
import re
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .generator_info import GeneratorInfo
from .errors import ProtocolError

MANIFEST_NAME = "manifest.json"
#: Version 2 stores the typed generator description (``GeneratorInfo``) as ``generator`` and the
#: generator's full config as ``generator_config``; version 1 stored the config as ``generator``.
MANIFEST_VERSION = 2
READABLE_MANIFEST_VERSIONS = (1, 2)

INDEX_SUFFIX = ".idx"
INDEX_MAGIC = b"SRIDX\x00\x01\n"

SHARD_PATTERN = re.compile(r"^shard-(\d{6,})\.tar$")
TEMP_PATTERN = re.compile(r"^\.shard-(\d{6,})\.tar\.tmp$")
INDEX_TEMP_PATTERN = re.compile(r"^\.shard-(\d{6,})\.tar\.idx\.tmp$")
MEMBER_PATTERN = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")
GROUP_IMAGE_PATTERN = re.compile(r"^(\d+)\.(png|jpg|jpeg|webp)$")

#: Stored image format -> (member extension, protocol encoding name).
IMAGE_FORMATS: dict[str, tuple[str, str]] = {
    "png": ("png", "png"),
    "jpg": ("jpg", "jpeg"),
    "jpeg": ("jpg", "jpeg"),
    "webp": ("webp", "webp"),
}
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


class ShardLayoutError(ValueError):
    """A manifest or shard that does not follow the layout (the message names the file)."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def temp_name(index: int) -> str:
    return f".shard-{index:06d}.tar.tmp"


def index_name(shard: str) -> str:
    """File name of the sample index of the shard (or any tar) named ``shard``."""
    return shard + INDEX_SUFFIX


def shard_index(name: str) -> int | None:
    """The index of a complete shard's file name, or ``None`` when it is not one."""
    match = SHARD_PATTERN.match(name)
    return int(match.group(1)) if match else None


def check_key(key: str) -> None:
    """A group id must be usable as a WebDataset key."""
    if not key or "." in key or "/" in key:
        raise ShardLayoutError(f"group_id {key!r} must be non-empty without '.' or '/' (it is the WebDataset key)")


def split_member(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a tar member name by the WebDataset rule, or ``None``."""
    match = MEMBER_PATTERN.match(name)
    return (match.group(1), match.group(2)) if match else None


def group_members(key: str, num_images: int, extension: str) -> list[str]:
    """Member names of one group, in the order they are written."""
    return [f"{key}.txt", f"{key}.json", *(f"{key}.{j}.{extension}" for j in range(num_images))]


@dataclass
class ShardRecord:
    """One complete shard as the manifest lists it."""

    name: str
    groups: int
    images: int
    caption_ids: list[int]
    group_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "groups": self.groups,
            "images": self.images,
            "caption_ids": list(self.caption_ids),
            "group_ids": list(self.group_ids),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str, with_ids: bool = True) -> "ShardRecord":
        """``with_ids=False`` leaves ``caption_ids`` / ``group_ids`` empty (a reader needs only the
        counts; converting the ids is most of the cost of reading a large manifest)."""
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or shard_index(data["name"]) is None:
            raise ShardLayoutError(f"{where}: not a shard entry with a 'shard-NNNNNN.tar' name")
        try:
            return cls(
                name=data["name"],
                groups=int(data["groups"]),
                images=int(data["images"]),
                caption_ids=[int(c) for c in data.get("caption_ids", [])] if with_ids else [],
                group_ids=[str(g) for g in data.get("group_ids", [])] if with_ids else [],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardLayoutError(f"{where}: bad shard entry ({type(exc).__name__}: {exc})") from None


@dataclass
class Manifest:
    """``manifest.json``: which shards are complete and which generator made them.

    Attributes:
        generator: the generator description (``None`` only in version-1 manifests without one).
        fingerprint: the generator fingerprint; a writer never mixes two in one directory.
        shards: the complete shards, in index order of writing.
        generator_config: the generator's full resolved config (generator side; opaque to readers).
        run: further fields the writer checks on resume (seed, images_per_group, caption shard, ...).
        version: the schema version read (written as ``MANIFEST_VERSION``).
    """

    generator: GeneratorInfo | None
    fingerprint: str
    shards: list[ShardRecord] = field(default_factory=list)
    generator_config: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    @property
    def save_size(self) -> int | None:
        """Side of the stored images, when the manifest says it."""
        if self.generator is not None:
            return self.generator.save_size
        size = self.generator_config.get("save_size")
        return size if isinstance(size, int) and not isinstance(size, bool) else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "generator": self.generator.to_wire() if self.generator is not None else None,
            "generator_config": self.generator_config,
            "fingerprint": self.fingerprint,
            "run": self.run,
            "shards": [s.to_dict() for s in self.shards],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str, with_ids: bool = True) -> "Manifest":
        if not isinstance(data, dict) or not isinstance(data.get("shards"), list):
            raise ShardLayoutError(f"{where}: expected an object with a 'shards' list")
        version = data.get("version")
        if isinstance(version, bool) or version not in READABLE_MANIFEST_VERSIONS:
            raise ShardLayoutError(
                f"{where}: unsupported manifest version {version!r} (readable: {list(READABLE_MANIFEST_VERSIONS)})"
            )
        shards = [ShardRecord.from_dict(entry, f"{where}: shards[{i}]", with_ids)
                  for i, entry in enumerate(data["shards"])]
        fingerprint = data.get("fingerprint")
        if not isinstance(fingerprint, str):
            raise ShardLayoutError(f"{where}: 'fingerprint' must be a string, got {type(fingerprint).__name__}")
        if version == 1:
            # version 1: the config was stored as ``generator``; the run fields sat at the top level.
            config = data.get("generator") if isinstance(data.get("generator"), dict) else {}
            run = {k: v for k, v in data.items() if k not in ("version", "generator", "fingerprint", "shards")}
            return cls(None, fingerprint, shards, dict(config), run, version=1)
        try:
            info = GeneratorInfo.from_wire(data.get("generator"), where=f"{where}: generator")
        except ProtocolError as exc:
            raise ShardLayoutError(exc.message) from None
        config = data.get("generator_config") or {}
        run = data.get("run") or {}
        if not isinstance(config, dict) or not isinstance(run, dict):
            raise ShardLayoutError(f"{where}: 'generator_config' and 'run' must be objects")
        return cls(info, fingerprint, shards, config, run, version=version)


def read_manifest(directory: str | Path, with_ids: bool = True) -> Manifest | None:
    """The manifest of ``directory`` (a local path or a URL, :mod:`infra.storage`), or ``None``
    when it has none.

    Raises:
        ShardLayoutError: the file exists but is unreadable or malformed (names the file).
        storage.StorageError: the URL's scheme has no filesystem installed.
        Other exceptions of the filesystem (missing bucket, credentials, endpoint) pass through.
    """
    from infra import storage

    where = storage.join(os.fspath(directory), MANIFEST_NAME)
    try:
        raw = storage.read_bytes(where)
    except FileNotFoundError:
        return None
    except (IsADirectoryError, NotADirectoryError) as exc:
        raise ShardLayoutError(f"{where}: cannot read the shard manifest ({exc})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardLayoutError(f"{where}: cannot read the shard manifest ({exc})") from None
    return Manifest.from_dict(data, where, with_ids)


def write_manifest(directory: str | Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` atomically (temp file, fsync, rename, fsync of the directory)."""
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(manifest.to_dict(), indent=1) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def fsync_directory(directory: str | Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def scan_shard(path: str | Path) -> ShardRecord:
    """Read a complete shard back into its manifest record.

    Raises:
        ShardLayoutError: a group's ``KEY.json`` disagrees with its key or lacks fields.
        tarfile.TarError / OSError: not a readable tar.
    """
    path = Path(path)
    caption_ids: list[int] = []
    group_ids: list[str] = []
    images = 0
    with tarfile.open(path, "r") as tar:
        for member in tar:
            parts = split_member(member.name)
            if parts is None:
                continue
            key, extension = parts
            if extension == "json":
                try:
                    header = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                    caption_id, group_id = int(header["caption_id"]), str(header["group_id"])
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise ShardLayoutError(f"{path}: member {member.name} is not a group header ({exc})") from None
                if group_id != key:
                    raise ShardLayoutError(f"{path}: member {member.name} holds group_id {group_id!r}")
                caption_ids.append(caption_id)
                group_ids.append(group_id)
            elif GROUP_IMAGE_PATTERN.match(extension):
                images += 1
    return ShardRecord(path.name, len(group_ids), images, caption_ids, group_ids)


@dataclass
class ShardIndex:
    """Byte ranges of the samples of one tar: ``ranges`` int64 ``[count, 2]`` = ``[start, end)`` of
    each sample's members, in file order (``start`` is the first member's header, ``end`` the end of
    the last member's data).

    Attributes:
        tar_bytes: size of the tar the ranges describe; a reader refuses the index when the tar's
            size differs (truncated, rewritten).
        identity: ``""`` for an index the shard writer committed with its shard (valid for any copy
            of that tar); a reader's scan cache stores ``"mtime:<ns>"`` or ``"etag:<tag>"`` and is
            rebuilt when the tar's identity changes.
        damaged: the scan that made it found a damaged tar (only its intact samples are listed).

    On disk: ``INDEX_MAGIC``, a little-endian uint32 header length, a JSON header
    (``tar_bytes``, ``count``, ``identity``, ``damaged``) padded with spaces to a multiple of 8 bytes,
    then the ranges as little-endian int64 (16 bytes per sample).
    """

    tar_bytes: int
    ranges: np.ndarray
    identity: str = ""
    damaged: bool = False

    @property
    def count(self) -> int:
        return int(len(self.ranges))

    def to_bytes(self) -> bytes:
        ranges = np.ascontiguousarray(self.ranges, dtype="<i8").reshape(-1, 2)
        header = json.dumps({"tar_bytes": int(self.tar_bytes), "count": len(ranges), "identity": self.identity,
                             "damaged": bool(self.damaged)}).encode("utf-8")
        header += b" " * (-(len(INDEX_MAGIC) + 4 + len(header)) % 8)
        return INDEX_MAGIC + struct.pack("<I", len(header)) + header + ranges.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "ShardIndex":
        """Parse and check an index (ranges ascending, inside ``tar_bytes``).

        Raises:
            ShardLayoutError: not an index, or inconsistent (names ``where``).
        """
        start = len(INDEX_MAGIC) + 4
        if len(data) < start or data[: len(INDEX_MAGIC)] != INDEX_MAGIC:
            raise ShardLayoutError(f"{where}: not a shard index (bad magic)")
        (header_len,) = struct.unpack_from("<I", data, len(INDEX_MAGIC))
        try:
            header = json.loads(data[start : start + header_len])
            tar_bytes, count = int(header["tar_bytes"]), int(header["count"])
            identity, damaged = str(header.get("identity", "")), bool(header.get("damaged", False))
        except (ValueError, KeyError, TypeError) as exc:
            raise ShardLayoutError(f"{where}: unreadable shard index header ({exc})") from None
        body = data[start + header_len :]
        if count < 0 or len(body) != 16 * count:
            raise ShardLayoutError(f"{where}: shard index holds {len(body)} bytes of ranges, its header says {count} samples")
        ranges = np.frombuffer(body, dtype="<i8").reshape(count, 2)
        if count and (ranges[0, 0] < 0 or (ranges[:, 1] <= ranges[:, 0]).any() or (ranges[1:, 0] < ranges[:-1, 1]).any()):
            raise ShardLayoutError(f"{where}: shard index ranges are not ascending, non-empty byte ranges")
        if count and int(ranges[-1, 1]) > tar_bytes:
            raise ShardLayoutError(f"{where}: shard index ranges end at byte {int(ranges[-1, 1])}, past the tar's {tar_bytes}")
        return cls(tar_bytes, ranges, identity, damaged)


def scan_ranges(handle: Any, size: int) -> tuple[np.ndarray, bool]:
    """Sample byte ranges of a tar read from the file object ``handle`` (member headers only; ``size``:
    the file's size) and whether the tar is damaged (only its intact samples are returned).

    Raises:
        OSError: not a readable tar at all.
    """
    members: list[tarfile.TarInfo] = []
    damaged = False
    try:
        with tarfile.open(fileobj=handle, mode="r|") as stream:
            for member in stream:
                if member.isfile():
                    members.append(member)
    except (tarfile.TarError, EOFError, OSError):
        damaged = True
    intact = [m for m in members if m.offset_data + m.size <= size]
    damaged = damaged or len(intact) < len(members)
    ranges: list[list[int]] = []
    last_key = None
    for member in intact:
        parts = split_member(member.name)
        if parts is None:
            continue
        if parts[0] != last_key:
            ranges.append([member.offset, member.offset_data + member.size])
            last_key = parts[0]
        else:
            ranges[-1][1] = member.offset_data + member.size
    if damaged and not ranges:
        raise OSError("not a readable tar file")
    return np.asarray(ranges, dtype=np.int64).reshape(-1, 2), damaged
