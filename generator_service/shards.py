"""Offline shards: WebDataset-compatible tar files of caption groups, plus a resumable manifest.

Layout of ``OUT/`` (docs/architecture.md, "Offline shards"):

- ``shard-{index:06d}.tar``: one sample per group, members ``KEY.txt`` (caption), ``KEY.json``
  (the group's protocol header fields), ``KEY.0.png`` ... ``KEY.{m-1}.png`` (or ``.jpg``/``.webp``).
- ``.shard-{index:06d}.tar.tmp``: the shard being written; renamed when complete.
- ``manifest.json``: the complete shards, rewritten atomically after each shard.

A writer killed at any moment leaves only complete, listed shards (plus a stray temp file that the
next run deletes), so a rerun skips exactly the groups already on disk.
"""
from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from protocol import Group

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
LOCK_NAME = ".writer.lock"
SHARD_PATTERN = re.compile(r"^shard-(\d{6,})\.tar$")
TEMP_PATTERN = re.compile(r"^\.shard-(\d{6,})\.tar\.tmp$")

#: ``--format`` value -> (file extension, PIL format name, protocol encoding name).
IMAGE_FORMATS: dict[str, tuple[str, str, str]] = {
    "png": ("png", "PNG", "png"),
    "jpg": ("jpg", "JPEG", "jpeg"),
    "jpeg": ("jpg", "JPEG", "jpeg"),
    "webp": ("webp", "WEBP", "webp"),
}


class ShardError(RuntimeError):
    """An output directory that cannot be written to or resumed (the message names it)."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def temp_name(index: int) -> str:
    return f".shard-{index:06d}.tar.tmp"


def encode_image(image: np.ndarray, image_format: str = "png", quality: int = 95) -> bytes:
    """Encode one uint8 ``[H, W, 3]`` image as png / jpg / webp bytes (``quality`` for the lossy ones)."""
    _, pil_format, _ = IMAGE_FORMATS[image_format]
    buffer = io.BytesIO()
    options: dict[str, Any] = {}
    if pil_format in ("JPEG", "WEBP"):
        options["quality"] = int(quality)
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format=pil_format, **options)
    return buffer.getvalue()


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
    def from_dict(cls, data: dict[str, Any]) -> "ShardRecord":
        return cls(
            name=str(data["name"]),
            groups=int(data["groups"]),
            images=int(data["images"]),
            caption_ids=[int(c) for c in data.get("caption_ids", [])],
            group_ids=[str(g) for g in data.get("group_ids", [])],
        )


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    """The parsed ``manifest.json`` of ``out_dir``, or ``None`` when there is none."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ShardError(f"{path}: cannot read the shard manifest ({exc})") from exc
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION or "shards" not in data:
        raise ShardError(f"{path}: not a version-{MANIFEST_VERSION} shard manifest")
    return data


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def scan_shard(path: Path) -> ShardRecord:
    """Read a shard written by this module back into its manifest record (raises on a bad tar)."""
    caption_ids: list[int] = []
    group_ids: list[str] = []
    images = 0
    with tarfile.open(path, "r") as tar:
        for member in tar:
            key, _, suffix = member.name.partition(".")
            if suffix == "json":
                header = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                caption_ids.append(int(header["caption_id"]))
                group_ids.append(str(header["group_id"]))
                if header.get("group_id") != key:
                    raise ShardError(f"{path}: member {member.name} holds group_id {header.get('group_id')!r}")
            elif suffix.count(".") == 1 and suffix.split(".")[0].isdigit():
                images += 1
    return ShardRecord(path.name, len(group_ids), images, caption_ids, group_ids)


class ShardWriter:
    """Writes caption groups into WebDataset tar shards of ``shard_size`` groups each.

    Use ``open()`` (or ``with``) before ``write``: it takes the directory's lock, checks that an
    existing manifest comes from the same generator, deletes stray temp files and adopts complete
    shards a killed writer renamed but did not list yet. ``done_group_ids`` / ``done_caption_ids``
    then hold what is on disk already, so the caller skips it.

    Args:
        out_dir: the output directory (created when missing).
        generator_config: the generator's config dict, stored in the manifest.
        fingerprint: the generator fingerprint; resuming a directory with another one is an error.
        shard_size: groups per shard (the last shard of a run may hold fewer).
        image_format: ``png`` | ``jpg`` | ``webp``.
        quality: encoder quality for jpg / webp.
        extra: further manifest fields (e.g. the caption shard ``i/N``), checked on resume like
            the fingerprint.
    """

    def __init__(
        self,
        out_dir: str | Path,
        generator_config: dict[str, Any],
        fingerprint: str,
        shard_size: int = 1000,
        image_format: str = "png",
        quality: int = 95,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image format must be one of png, jpg, webp; got {image_format!r}")
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {quality}")
        self.out_dir = Path(out_dir)
        self.generator_config = dict(generator_config)
        self.fingerprint = fingerprint
        self.shard_size = int(shard_size)
        self.image_format = image_format
        self.quality = int(quality)
        self.extra = dict(extra or {})
        self.extension, _, self.encoding = IMAGE_FORMATS[image_format]
        self.shards: list[ShardRecord] = []
        self.done_group_ids: set[str] = set()
        self.done_caption_ids: set[int] = set()
        self.groups_written = 0  # this run
        self.images_written = 0  # this run
        self._next_index = 0
        self._tar: tarfile.TarFile | None = None
        self._tar_file: Any = None
        self._current: ShardRecord | None = None
        self._lock_fd: int | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def open(self) -> "ShardWriter":
        """Lock the directory and load its state; see the class docstring."""
        if self._lock_fd is not None:
            return self
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ShardError(f"cannot create output directory {self.out_dir}: {exc}") from exc
        lock_fd = os.open(self.out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise ShardError(f"{self.out_dir} is being written by another process (lock {LOCK_NAME} is held)") from None
        self._lock_fd = lock_fd
        try:
            self._load()
        except BaseException:
            self._release_lock()
            raise
        return self

    def _load(self) -> None:
        manifest = read_manifest(self.out_dir)
        if manifest is not None:
            theirs = manifest.get("fingerprint")
            if theirs != self.fingerprint:
                raise ShardError(
                    f"{self.out_dir} holds shards of generator fingerprint {theirs!r}, but this run's generator "
                    f"fingerprint is {self.fingerprint!r}: use another output directory or the same generator settings"
                )
            for key, value in self.extra.items():
                if key in manifest and manifest[key] != value:
                    raise ShardError(
                        f"{self.out_dir} was written with {key} = {manifest[key]!r}, this run has {key} = {value!r}"
                    )
            self.shards = [ShardRecord.from_dict(s) for s in manifest["shards"]]
        listed = {s.name for s in self.shards}
        indices = [int(SHARD_PATTERN.match(s.name).group(1)) for s in self.shards if SHARD_PATTERN.match(s.name)]
        for entry in sorted(self.out_dir.iterdir()):
            if TEMP_PATTERN.match(entry.name):
                log.info("removing incomplete shard %s left by an interrupted run", entry)
                entry.unlink()
            elif SHARD_PATTERN.match(entry.name) and entry.name not in listed:
                # Renamed (so complete and synced) but the manifest update did not happen: adopt it.
                try:
                    record = scan_shard(entry)
                except (tarfile.TarError, ShardError, OSError, ValueError, KeyError) as exc:
                    aside = entry.with_name(entry.name + ".unreadable")
                    log.warning("shard %s is not listed and cannot be read (%s); moved to %s", entry, exc, aside)
                    os.replace(entry, aside)
                    continue
                log.info("adopting complete shard %s (%d groups) missing from the manifest", entry, record.groups)
                self.shards.append(record)
                indices.append(int(SHARD_PATTERN.match(entry.name).group(1)))
        for record in self.shards:
            self.done_group_ids.update(record.group_ids)
            self.done_caption_ids.update(record.caption_ids)
        self._next_index = max(indices, default=-1) + 1
        self._write_manifest()

    def close(self) -> None:
        """Complete the open shard (if it holds any group) and release the directory."""
        try:
            self.flush()
        finally:
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "ShardWriter":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writing -----------------------------------------------------------------------------

    def write(self, group: Group) -> None:
        """Append one group to the open shard; completes the shard when it reaches ``shard_size``."""
        if self._lock_fd is None:
            raise ShardError(f"ShardWriter({self.out_dir}).write called before open()")
        if "." in group.group_id or "/" in group.group_id:
            raise ShardError(f"group_id {group.group_id!r} must not contain '.' or '/' (it is the WebDataset key)")
        if group.group_id in self.done_group_ids:
            log.debug("group %s is already in %s; not written twice", group.group_id, self.out_dir)
            return
        images = self._encoded_images(group)
        if self._tar is None:
            self._start_shard()
        assert self._tar is not None and self._current is not None
        header = group.header_fields()
        header["encoding"] = self.encoding
        key = group.group_id
        self._add_member(f"{key}.txt", group.caption.encode("utf-8"))
        self._add_member(f"{key}.json", json.dumps(header, sort_keys=True).encode("utf-8"))
        for index, data in enumerate(images):
            self._add_member(f"{key}.{index}.{self.extension}", data)
        self._current.groups += 1
        self._current.images += len(images)
        self._current.caption_ids.append(group.caption_id)
        self._current.group_ids.append(key)
        self.done_group_ids.add(key)
        self.done_caption_ids.add(group.caption_id)
        self.groups_written += 1
        self.images_written += len(images)
        if self._current.groups >= self.shard_size:
            self.flush()

    def _encoded_images(self, group: Group) -> list[bytes]:
        if group.encoding == "raw":
            if group.images is None:
                raise ShardError(f"group {group.group_id} has encoding 'raw' but no images")
            return [encode_image(img, self.image_format, self.quality) for img in group.images]
        if group.encoding == self.encoding and group.encoded is not None:
            return list(group.encoded)
        raise ShardError(
            f"group {group.group_id} arrives {group.encoding}-encoded; this writer stores {self.encoding} "
            "and re-encodes only raw groups"
        )

    def _start_shard(self) -> None:
        index = self._next_index
        self._next_index += 1
        path = self.out_dir / temp_name(index)
        self._tar_file = open(path, "wb")
        self._tar = tarfile.open(fileobj=self._tar_file, mode="w", format=tarfile.USTAR_FORMAT)
        self._current = ShardRecord(shard_name(index), 0, 0, [], [])

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = int(time.time())
        info.mode = 0o644
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data))

    def flush(self) -> None:
        """Complete the open shard now (sync, rename, list it in the manifest)."""
        if self._tar is None or self._current is None:
            return
        record = self._current
        self._tar.close()
        self._tar_file.flush()
        os.fsync(self._tar_file.fileno())
        self._tar_file.close()
        index = int(SHARD_PATTERN.match(record.name).group(1))
        os.replace(self.out_dir / temp_name(index), self.out_dir / record.name)
        _fsync_dir(self.out_dir)
        self._tar = None
        self._tar_file = None
        self._current = None
        self.shards.append(record)
        self._write_manifest()
        log.info("wrote %s (%d groups, %d images)", self.out_dir / record.name, record.groups, record.images)

    def _write_manifest(self) -> None:
        manifest = {
            "version": MANIFEST_VERSION,
            "generator": self.generator_config,
            "fingerprint": self.fingerprint,
            **self.extra,
            "shards": [s.to_dict() for s in self.shards],
        }
        _write_atomic(self.out_dir / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")

    # --- summary -----------------------------------------------------------------------------

    @property
    def total_groups(self) -> int:
        """Groups in complete shards plus the open one (all runs)."""
        return sum(s.groups for s in self.shards) + (self._current.groups if self._current else 0)
