"""Recover the complete groups of the open shard a killed writer left behind.

``ShardWriter.write`` appends each group's members (``KEY.txt``, ``KEY.json``, ``KEY.0.png`` ...) to
the open shard's temp file and flushes them to the operating system before it returns; the online
service serves a group only after that (the shard sink comes before the server sink). So after a
``kill -9`` the temp file holds every group served from it, possibly followed by a torn member.
``salvage`` copies the complete groups, in order, into a complete shard under the temp file's
index; the caller lists it in the manifest like any other. (A machine crash can lose what the
operating system had not written yet; the temp file is fsynced only when the shard completes.)
"""
from __future__ import annotations

import json
import logging
import os
import tarfile
from pathlib import Path

from protocol.shards import GROUP_IMAGE_PATTERN, fsync_directory, shard_name, split_member

log = logging.getLogger(__name__)

#: Suffix of a salvage in progress (removed, and redone from the temp file, if it is interrupted).
SALVAGE_SUFFIX = ".salvage"


def complete_keys(temp: Path) -> list[str]:
    """Keys of the groups whose text, header and every image are in ``temp``, in order."""
    seen: dict[str, dict] = {}
    complete: list[str] = []
    try:
        with tarfile.open(temp, "r:") as tar:
            for member in tar:
                parts = split_member(member.name)
                if parts is None or not member.isfile():
                    continue
                key, extension = parts
                entry = seen.setdefault(key, {"txt": False, "images": 0, "expected": None})
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if len(data) != member.size:
                    break  # torn member
                if extension == "txt":
                    entry["txt"] = True
                elif extension == "json":
                    entry["expected"] = int(json.loads(data)["shape"][0])
                elif GROUP_IMAGE_PATTERN.match(extension):
                    entry["images"] += 1
                if entry["txt"] and entry["expected"] is not None and entry["images"] == entry["expected"]:
                    complete.append(key)
    except (tarfile.TarError, OSError, EOFError, ValueError, KeyError, TypeError, IndexError) as exc:
        log.info("%s ends in a torn member (%s): keeping the %d complete group(s) before it", temp,
                 type(exc).__name__, len(complete))
    return complete


def salvage(temp: Path, index: int) -> Path | None:
    """Write the complete groups of temp shard ``temp`` into ``shard-{index}.tar`` (synced, renamed)
    and delete ``temp``; returns the new shard's path, or None when no group was complete."""
    keys = set(complete_keys(temp))
    if not keys:
        temp.unlink()
        return None
    final = temp.parent / shard_name(index)
    partial = temp.parent / (temp.name + SALVAGE_SUFFIX)
    with tarfile.open(temp, "r:") as source, open(partial, "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as target:
            try:
                for member in source:
                    parts = split_member(member.name)
                    if parts is not None and parts[0] in keys and member.isfile():
                        target.addfile(member, source.extractfile(member))
            except (tarfile.TarError, OSError, EOFError):
                pass  # the torn tail: every complete group came before it
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, final)
    temp.unlink()
    fsync_directory(temp.parent)
    log.warning("recovered %d complete group(s) of the open shard an interrupted run left, as %s", len(keys), final)
    return final
