"""The offline shard layout: the second contract between generator and trainer, defined once.

A shard directory holds:

- ``shard-{index:06d}.tar``: WebDataset-compatible tar files, one sample per caption group. The
  sample key is the ``group_id`` (no ``.`` or ``/``); members are ``KEY.txt`` (caption, UTF-8),
  ``KEY.json`` (the group's protocol header fields, ``Group.header_fields()``, with ``encoding`` =
  the stored image format) and ``KEY.{j}.{ext}`` for image ``j = 0 .. m-1`` (``ext`` png, jpg or webp).
- ``.shard-{index:06d}.tar.tmp``: a shard being written; renamed when complete, so a listed or
  renamed shard is never torn.
- ``manifest.json``: the complete shards (:class:`Manifest`), rewritten atomically after each one.

The key rule is WebDataset's: a member's key is its name up to the first dot of its base name, its
extension the rest (``KEY.3.png`` -> key ``KEY``, extension ``3.png``).
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .generator_info import GeneratorInfo
from .errors import ProtocolError

MANIFEST_NAME = "manifest.json"
#: Version 2 stores the typed generator description (``GeneratorInfo``) as ``generator`` and the
#: generator's full config as ``generator_config``; version 1 stored the config as ``generator``.
MANIFEST_VERSION = 2
READABLE_MANIFEST_VERSIONS = (1, 2)

SHARD_PATTERN = re.compile(r"^shard-(\d{6,})\.tar$")
TEMP_PATTERN = re.compile(r"^\.shard-(\d{6,})\.tar\.tmp$")
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
    def from_dict(cls, data: Any, where: str) -> "ShardRecord":
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or shard_index(data["name"]) is None:
            raise ShardLayoutError(f"{where}: not a shard entry with a 'shard-NNNNNN.tar' name")
        try:
            return cls(
                name=data["name"],
                groups=int(data["groups"]),
                images=int(data["images"]),
                caption_ids=[int(c) for c in data.get("caption_ids", [])],
                group_ids=[str(g) for g in data.get("group_ids", [])],
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
    def from_dict(cls, data: Any, where: str) -> "Manifest":
        if not isinstance(data, dict) or not isinstance(data.get("shards"), list):
            raise ShardLayoutError(f"{where}: expected an object with a 'shards' list")
        version = data.get("version")
        if isinstance(version, bool) or version not in READABLE_MANIFEST_VERSIONS:
            raise ShardLayoutError(
                f"{where}: unsupported manifest version {version!r} (readable: {list(READABLE_MANIFEST_VERSIONS)})"
            )
        shards = [ShardRecord.from_dict(entry, f"{where}: shards[{i}]") for i, entry in enumerate(data["shards"])]
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


def read_manifest(directory: str | Path) -> Manifest | None:
    """The manifest of ``directory``, or ``None`` when it has none.

    Raises:
        ShardLayoutError: the file exists but is unreadable or malformed (names the file).
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardLayoutError(f"{path}: cannot read the shard manifest ({exc})") from None
    return Manifest.from_dict(data, str(path))


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
