"""The offline shard writer: caption groups into WebDataset-compatible tar files, resumably.

The layout (member names, key rule, manifest schema) is defined in ``protocol.shards``, which the
trainer's offline source reads too; this module only writes it.

A writer killed at any moment leaves complete, listed shards plus the open shard's temp file; the
next ``open()`` turns the complete groups of that file into a listed shard (``shard_salvage``), so
a rerun skips exactly the groups already on disk and an online archive keeps every group it served.

The output may be an object-store URL (``s3://bucket/prefix``, any fsspec URL, :mod:`infra.storage`):
shards are then staged in a local folder and uploaded when complete, index first, then the shard
(each one PUT, visible only when complete), then the manifest, which stays the commit point. A
killed writer leaves at most an uploaded but unlisted shard, which the next run adopts, and its open
shard in the staging folder, which the next run on the same machine salvages and uploads like a
local one (:func:`staging_dir`: one folder per output URL and ``AWS_ENDPOINT_URL`` under
``$STABLEREP_STAGING``, default ``~/.cache/stablerep/staging``). Object stores have no locks: run one
writer per prefix.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from generator_service.shard_salvage import SALVAGE_SUFFIX, salvage
from infra import storage
from protocol import GeneratorInfo, Group
from protocol.shards import (
    IMAGE_FORMATS,
    INDEX_TEMP_PATTERN,
    MANIFEST_NAME,
    SHARD_PATTERN,
    TEMP_PATTERN,
    Manifest,
    ShardLayoutError,
    ShardIndex,
    ShardRecord,
    check_key,
    group_members,
    fsync_directory,
    index_name,
    read_manifest,
    scan_ranges,
    scan_shard,
    shard_index,
    shard_name,
    temp_name,
    write_manifest,
)

if TYPE_CHECKING:
    from generator_service.config import GeneratorConfig

log = logging.getLogger(__name__)

LOCK_NAME = ".writer.lock"
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}

__all__ = [
    "IMAGE_FORMATS", "LOCK_NAME", "MANIFEST_NAME", "SHARD_PATTERN", "ShardError", "ShardWriter",
    "encode_image", "read_manifest", "scan_shard", "temp_name",
]


class ShardError(RuntimeError):
    """An output directory that cannot be written to or resumed (the message names it)."""


def encode_image(image: np.ndarray, image_format: str = "png", quality: int = 95) -> bytes:
    """Encode one uint8 ``[H, W, 3]`` image as png / jpg / webp bytes (``quality`` for the lossy ones)."""
    extension, _ = IMAGE_FORMATS[image_format]
    pil_format = _PIL_FORMATS[extension]
    buffer = io.BytesIO()
    options: dict[str, Any] = {}
    if pil_format in ("JPEG", "WEBP"):
        options["quality"] = int(quality)
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format=pil_format, **options)
    return buffer.getvalue()


def staging_dir(where: str) -> Path:
    """The local folder where shards of the remote output ``where`` are staged: the same one for
    every run of this machine on that URL and endpoint, so a killed run's open shard is found again."""
    root = os.environ.get("STABLEREP_STAGING") or os.path.join(os.path.expanduser("~"), ".cache", "stablerep", "staging")
    key = hashlib.sha256(f"{where.rstrip('/')}\n{os.environ.get('AWS_ENDPOINT_URL', '')}".encode()).hexdigest()[:16]
    return Path(root) / key


class ShardWriter:
    """Writes caption groups into WebDataset tar shards of ``shard_size`` groups each.

    Use ``open()`` (or ``with``) before ``write``: it takes the directory's lock, checks that an
    existing manifest comes from the same generator, deletes stray temp files and adopts complete
    shards a killed writer renamed but did not list yet. ``done_group_ids`` / ``done_caption_ids``
    then hold what is on disk already, so the caller skips it.

    Args:
        out_dir: the output directory (created when missing).
        config: the generator's config: its description (``welcome_info()``), fingerprint and
            full config go into the manifest; resuming a directory of another fingerprint is an error.
        shard_size: groups per shard (the last shard of a run may hold fewer).
        image_format: ``png`` | ``jpg`` | ``webp``.
        quality: encoder quality for jpg / webp.
        run: further manifest fields (e.g. the caption shard ``i/N``), checked on resume like
            the fingerprint.
    """

    def __init__(
        self,
        out_dir: str | Path,
        config: "GeneratorConfig",
        shard_size: int = 1000,
        image_format: str = "png",
        quality: int = 95,
        run: dict[str, Any] | None = None,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image format must be one of png, jpg, webp; got {image_format!r}")
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {quality}")
        self.where = os.fspath(out_dir)  # the output as the user named it (path or URL)
        self.remote = storage.is_remote(self.where)
        if self.remote:
            storage.filesystem(self.where)  # an unknown scheme is refused here, never taken as a local path
        # local output: the folder itself; remote output: a local staging folder (made by open())
        self.out_dir = Path(storage.local_path(self.where) or ".")
        self.generator: GeneratorInfo = config.welcome_info()
        self.generator_config = config.to_dict()
        self.fingerprint = self.generator.fingerprint
        self.shard_size = int(shard_size)
        self.image_format = image_format
        self.quality = int(quality)
        self.run = dict(run or {})
        self.extension, self.encoding = IMAGE_FORMATS[image_format]
        self.shards: list[ShardRecord] = []
        self.done_group_ids: set[str] = set()
        self.done_caption_ids: set[int] = set()
        self.groups_written = 0  # this run
        self.images_written = 0  # this run
        self._next_index = 0
        self._tar: tarfile.TarFile | None = None
        self._tar_file: Any = None
        self._current: ShardRecord | None = None
        self._ranges: list[tuple[int, int]] = []  # byte range of every group of the open shard
        self._lock_fd: int | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def open(self) -> "ShardWriter":
        """Lock the directory and load its state; see the class docstring."""
        if self._lock_fd is not None:
            return self
        if self.remote:
            self.out_dir = staging_dir(self.where)
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
            self._remove_staging()
            raise
        return self

    def _remove_staging(self) -> None:
        """Remote output: remove the staging folder once nothing but its lock is left in it (a shard
        that could not be uploaded stays for the next run)."""
        if not self.remote or not self.out_dir.is_dir():
            return
        if all(entry.name == LOCK_NAME for entry in self.out_dir.iterdir()):
            shutil.rmtree(self.out_dir, ignore_errors=True)

    def _load(self) -> None:
        try:
            manifest = read_manifest(self.where)
        except ShardLayoutError as exc:
            raise ShardError(str(exc)) from None
        except storage.StorageError as exc:
            raise ShardError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a store's failure (bucket, credentials, endpoint): one line
            if not self.remote:
                raise
            raise ShardError(f"{self.where}: {storage.describe_failure(exc)}") from None
        if manifest is not None:
            theirs = manifest.fingerprint
            if theirs != self.fingerprint:
                raise ShardError(
                    f"{self.where} holds shards of generator fingerprint {theirs!r}, but this run's generator "
                    f"fingerprint is {self.fingerprint!r}: use another output directory or the same generator settings"
                )
            for key, value in self.run.items():
                if key in manifest.run and manifest.run[key] != value:
                    raise ShardError(
                        f"{self.where} was written with {key} = {manifest.run[key]!r}, this run has {key} = {value!r}"
                    )
            self.shards = list(manifest.shards)
        listed = {s.name for s in self.shards}
        indices = [shard_index(s.name) for s in self.shards]
        for entry in sorted(self.out_dir.iterdir()):
            if entry.name.endswith(SALVAGE_SUFFIX) or INDEX_TEMP_PATTERN.match(entry.name):
                entry.unlink()  # an interrupted salvage (redone from its temp file) or index write
        for entry in sorted(self.out_dir.iterdir()):
            temp = TEMP_PATTERN.match(entry.name)
            if temp and shard_name(int(temp.group(1))) not in listed:
                entry = salvage(entry, int(temp.group(1)))  # the open shard of a killed writer
                if entry is None:
                    continue
            elif temp:
                entry.unlink()  # its shard is listed already (a killed salvage or rename)
                continue
            if SHARD_PATTERN.match(entry.name) and entry.name not in listed:
                # Renamed (so complete and synced) but the manifest update did not happen: adopt it.
                try:
                    record = scan_shard(entry)
                except (tarfile.TarError, ShardLayoutError, OSError, ValueError, KeyError) as exc:
                    aside = entry.with_name(entry.name + ".unreadable")
                    log.warning("shard %s is not listed and cannot be read (%s); moved to %s", entry, exc, aside)
                    os.replace(entry, aside)
                    continue
                log.info("adopting complete shard %s (%d groups) missing from the manifest", entry, record.groups)
                if not entry.with_name(index_name(entry.name)).exists():  # a salvaged shard: index it now
                    self._write_index(entry)
                if self.remote:  # staged by a killed run (or its upload failed): uploaded before it is listed
                    self._upload(entry.name)
                self.shards.append(record)
                listed.add(entry.name)
                indices.append(shard_index(entry.name))
        if self.remote:
            self._adopt_uploaded(listed, indices)
        for record in self.shards:
            self.done_group_ids.update(record.group_ids)
            self.done_caption_ids.update(record.caption_ids)
        self._next_index = max(indices, default=-1) + 1
        self._write_manifest()

    def _adopt_uploaded(self, listed: set[str], indices: list[int | None]) -> None:
        """Remote output: adopt shards a killed writer uploaded but did not list."""
        try:
            names = storage.list_names(self.where)
        except Exception as exc:  # noqa: BLE001
            raise ShardError(f"{self.where}: {storage.describe_failure(exc)}") from None
        for name in sorted(names):
            if not SHARD_PATTERN.match(name) or name in listed:
                continue
            local = self.out_dir / name
            try:
                local.write_bytes(storage.read_bytes(storage.join(self.where, name)))
                record = scan_shard(local)
            except (tarfile.TarError, ShardLayoutError, OSError, ValueError, KeyError) as exc:
                log.warning("shard %s in %s is not listed and cannot be read (%s); left as is", name, self.where, exc)
                continue
            finally:
                local.unlink(missing_ok=True)
            log.info("adopting complete shard %s (%d groups) missing from the manifest of %s", name, record.groups,
                     self.where)
            self.shards.append(record)
            indices.append(shard_index(name))

    def close(self) -> None:
        """Complete the open shard (if it holds any group) and release the directory."""
        try:
            self.flush()
        finally:
            self._release_lock()
            self._remove_staging()

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
        try:
            check_key(group.group_id)
        except ShardLayoutError as exc:
            raise ShardError(str(exc)) from None
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
        names = group_members(key, len(images), self.extension)
        contents = [group.caption.encode("utf-8"), json.dumps(header, sort_keys=True).encode("utf-8"), *images]
        start = self._tar.offset
        for name, data in zip(names, contents):
            self._add_member(name, data)
        self._ranges.append((start, self._tar.offset - (-len(contents[-1]) % tarfile.BLOCKSIZE)))
        self._tar_file.flush()  # in the OS before it is served: a killed run's next open recovers it (shard_salvage)
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
        self._ranges = []

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
        index = shard_index(record.name)
        tar_path = self.out_dir / temp_name(index)
        sample_index = ShardIndex(tar_path.stat().st_size, np.asarray(self._ranges, dtype=np.int64).reshape(-1, 2))
        # The index first: a shard that exists under its final name always has its index.
        self._commit_index(record.name, sample_index)
        os.replace(tar_path, self.out_dir / record.name)
        fsync_directory(self.out_dir)
        if self.remote:
            self._upload(record.name)
        self._tar = None
        self._tar_file = None
        self._current = None
        self.shards.append(record)
        self._write_manifest()
        log.info("wrote %s (%d groups, %d images)", self.out_dir / record.name, record.groups, record.images)

    def _commit_index(self, name: str, sample_index: ShardIndex) -> None:
        """Write shard ``name``'s index (synced temp file, renamed into place)."""
        index_tmp = self.out_dir / f".{index_name(name)}.tmp"
        with open(index_tmp, "wb") as handle:
            handle.write(sample_index.to_bytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(index_tmp, self.out_dir / index_name(name))

    def _write_index(self, shard: Path) -> None:
        """Index a complete shard written without one (a salvaged open shard) by scanning it."""
        size = shard.stat().st_size
        with open(shard, "rb") as handle:
            ranges, _ = scan_ranges(handle, size)
        self._commit_index(shard.name, ShardIndex(size, ranges))

    def _upload(self, name: str) -> None:
        """Remote output: upload a completed shard's index, then the shard; remove the staged files."""
        try:
            for file_name in (index_name(name), name):
                storage.upload(str(self.out_dir / file_name), storage.join(self.where, file_name))
                (self.out_dir / file_name).unlink()
        except Exception as exc:  # noqa: BLE001
            raise ShardError(f"cannot upload {name} to {self.where}: {storage.describe_failure(exc)}") from None

    def _write_manifest(self) -> None:
        manifest = Manifest(self.generator, self.fingerprint, list(self.shards), self.generator_config, self.run)
        if not self.remote:
            write_manifest(self.out_dir, manifest)
            return
        try:
            storage.write_bytes(storage.join(self.where, MANIFEST_NAME), (json.dumps(manifest.to_dict(), indent=1) + "\n").encode())
        except Exception as exc:  # noqa: BLE001
            raise ShardError(f"cannot write the manifest of {self.where}: {storage.describe_failure(exc)}") from None
