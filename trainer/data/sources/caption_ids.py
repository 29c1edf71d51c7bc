"""Caption ids that stay unique over every input of a run.

The contrastive labels are caption ids: two groups with the same id are positives of each other.
Each input numbers its captions from 0 (CSV row, shard ``caption_id``, generator caption index), so
two inputs with different caption files would reuse ids. Every input therefore has a *namespace*,
a stable string naming what it contains:

- official CSV: ``csv:`` + SHA-256 of the file's bytes;
- generator shard directory: ``shards:`` + manifest fingerprint + the manifest's ``captions_digest``;
- tar files / patterns without a manifest: ``tars:`` + digest of the resolved real paths;
- online generator: ``generator:`` + the fingerprint in its ``welcome``.

When a run's inputs have more than one namespace, every id becomes
``namespaced_caption_id(namespace, local_id)`` (63 bits of BLAKE2b), the same on every rank and after
every resume; with a single namespace the local ids are kept as they are. Two inputs with the same
namespace (the same CSV or shard set twice) share ids, as they share captions.
"""
from __future__ import annotations

import hashlib
from typing import Iterable


def namespaced_caption_id(namespace: str, local_id: int | str) -> int:
    """Stable 63-bit id of caption ``local_id`` of the input named ``namespace``."""
    message = f"{namespace}\0{local_id}".encode("utf-8")
    return int.from_bytes(hashlib.blake2b(message, digest_size=8).digest(), "big") >> 1


def needs_namespacing(namespaces: Iterable[str]) -> bool:
    """True when the inputs carry more than one distinct namespace."""
    return len(set(namespaces)) > 1


def file_digest(path: str, chunk: int = 1 << 20) -> str:
    """SHA-256 (first 16 hex digits) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:16]


def text_digest(parts: Iterable[str]) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:16]
