"""Where shard sets live: a local path, or any fsspec URL (``s3://``, ``gs://``, ``hf://``,
``http(s)://`` read-only, ``file://``).

Both sides of the shard contract (:mod:`protocol.shards`) go through these few functions, so a
bucket and a local folder behave alike. Local paths use plain file calls (one ``pread`` per
group); URLs use the fsspec filesystem of their scheme, which takes credentials and endpoints from
the standard places (``AWS_*`` environment variables and profiles, gcloud defaults, fsspec's own
configuration), so S3-compatible stores (MinIO, Ceph, R2) need no project setting.

A URL whose scheme has no installed filesystem is refused (:class:`StorageError`, naming the package
to install); it is never taken for a local path. Access failures (missing bucket, credentials,
unreachable endpoint) become one :class:`StorageError` line naming the URL and the cause.
"""
from __future__ import annotations

import os
import posixpath
import re
import uuid
from typing import Any

URL_PATTERN = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
#: Scheme -> what to install, for the schemes a user is likely to try.
SCHEME_PACKAGES = {"s3": "s3fs (pip install 'stablerep[s3]')", "s3a": "s3fs (pip install 'stablerep[s3]')",
                   "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "hf": "huggingface_hub",
                   "http": "aiohttp", "https": "aiohttp"}
READ_ONLY_SCHEMES = ("http", "https")


class StorageError(ValueError):
    """A location that cannot be used (one line: the URL and the cause)."""


def scheme_of(target: str) -> str | None:
    """The URL scheme of ``target``, or ``None`` for a plain local path."""
    match = URL_PATTERN.match(str(target))
    return match.group(1).lower() if match else None


def local_path(target: str | os.PathLike) -> str | None:
    """The local path ``target`` names (plain path or ``file://``), or ``None`` for a remote URL."""
    text = os.fspath(target)
    scheme = scheme_of(text)
    if scheme is None:
        return text
    if scheme in ("file", "local"):
        return text.split("://", 1)[1]
    return None


def is_remote(target: str | os.PathLike) -> bool:
    return local_path(target) is None


def join(base: str, name: str) -> str:
    """``base/name`` for a local path or a URL."""
    return os.path.join(base, name) if not is_remote(base) else posixpath.join(base.rstrip("/"), name)


def filesystem(url: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path inside it)`` of a remote ``url``.

    Raises:
        StorageError: the scheme has no installed filesystem (names the package).
    """
    scheme = scheme_of(url) or "file"
    package = SCHEME_PACKAGES.get(scheme, f"an fsspec filesystem for {scheme}://")
    try:
        import fsspec
        from fsspec.core import url_to_fs
    except ImportError:
        raise StorageError(f"{url}: {scheme}:// URLs need fsspec and {package}") from None
    if scheme not in fsspec.available_protocols():
        raise StorageError(f"{url}: unknown URL scheme {scheme}:// (no fsspec filesystem for it; not a local path)")
    try:
        return url_to_fs(url)
    except ImportError as exc:
        raise StorageError(f"{url}: no filesystem for {scheme}:// is installed; install {package} ({exc})") from None
    except (ValueError, TypeError) as exc:
        raise StorageError(f"{url}: {describe_failure(exc)}") from None


def describe_failure(exc: BaseException) -> str:
    """The cause of a failed storage call, in one line."""
    name = type(exc).__name__
    text = " ".join(str(exc).split()) or name
    if name == "NoCredentialsError" or "Unable to locate credentials" in text:
        return "no credentials (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or "Could not connect" in text:
        return f"endpoint unreachable ({text[:200]})"
    if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text:
        return f"not found (missing bucket or prefix?) ({text[:200]})"
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "InvalidAccessKeyId" in text:
        return f"access denied ({text[:200]})"
    return f"{name}: {text[:300]}"


def read_bytes(target: str, start: int | None = None, end: int | None = None) -> bytes:
    """Bytes ``[start, end)`` of a file (all of it by default): one ranged GET for a URL."""
    path = local_path(target)
    if path is not None:
        with open(path, "rb") as handle:
            if start is None:
                return handle.read()
            handle.seek(start)
            return handle.read((end if end is not None else os.path.getsize(path)) - start)
    fs, inner = filesystem(target)
    return fs.cat_file(inner, start=start, end=end)


def read_ranges(ranges: list[tuple[str, int, int]]) -> list[bytes | BaseException]:
    """Bytes ``[start, end)`` of each ``(url, start, end)``: one ranged GET each, run concurrently by
    the filesystem (all URLs of one scheme and store); a failed range maps to its exception."""
    if not ranges:
        return []
    fs, _ = filesystem(ranges[0][0])
    paths = [filesystem(url)[1] for url, _, _ in ranges]
    return list(fs.cat_ranges(paths, [s for _, s, _ in ranges], [e for _, _, e in ranges], on_error="return"))


def read_many(targets: list[str]) -> dict[str, bytes | BaseException]:
    """Whole files, fetched concurrently for URLs; a file that fails maps to its exception."""
    out: dict[str, bytes | BaseException] = {}
    remote = [t for t in targets if is_remote(t)]
    for target in targets:
        if not is_remote(target):
            try:
                out[target] = read_bytes(target)
            except OSError as exc:
                out[target] = exc
    if remote:
        fs, _ = filesystem(remote[0])
        inner = {filesystem(t)[1]: t for t in remote}
        for key, value in fs.cat(list(inner), on_error="return").items():
            out[inner.get(key, key)] = value
        for target in remote:
            out.setdefault(target, FileNotFoundError(target))
    return out


def file_identity(target: str) -> tuple[int, str]:
    """``(size in bytes, identity)`` of a file: identity is ``mtime:<ns>`` locally, the ETag (or
    mtime) of an object. Raises ``OSError`` / ``FileNotFoundError`` when it does not exist."""
    path = local_path(target)
    if path is not None:
        st = os.stat(path)
        return st.st_size, f"mtime:{st.st_mtime_ns}"
    fs, inner = filesystem(target)
    return info_identity(fs.info(inner))


def info_identity(info: dict[str, Any]) -> tuple[int, str]:
    """``(size, identity)`` from an fsspec ``info`` / ``ls(detail=True)`` entry."""
    size = int(info.get("size") or info.get("Size") or 0)
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return size, f"etag:{str(etag).strip(chr(34))}"
    mtime = info.get("LastModified") or info.get("Last-Modified") or info.get("mtime") or info.get("last_modified") or ""
    return size, f"mtime:{mtime}"


def write_bytes(target: str, data: bytes) -> None:
    """Write a whole file so that readers see either nothing or all of it: a synced temp file renamed
    locally; one PUT (atomic in object stores) for a URL."""
    path = local_path(target)
    if path is not None:
        tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    scheme = scheme_of(target)
    if scheme in READ_ONLY_SCHEMES:
        raise StorageError(f"{target}: {scheme}:// is read-only")
    fs, inner = filesystem(target)
    fs.pipe_file(inner, data)


def upload(local: str, target: str) -> None:
    """Copy a complete local file to the URL ``target`` (one object, visible only when complete)."""
    fs, inner = filesystem(target)
    fs.put_file(local, inner)


def exists(target: str) -> bool:
    path = local_path(target)
    if path is not None:
        return os.path.exists(path)
    fs, inner = filesystem(target)
    return bool(fs.exists(inner))


def list_names(directory: str) -> dict[str, tuple[int, str]]:
    """``{file name: (size, identity)}`` of the files directly in ``directory`` ({} when missing).

    One LIST for an object store; a store whose listing has no sizes (an HTTP folder page) is also
    asked for each file's size (one HEAD per file)."""
    path = local_path(directory)
    if path is not None:
        if not os.path.isdir(path):
            return {}
        out = {}
        for entry in os.scandir(path):
            if entry.is_file():
                st = entry.stat()
                out[entry.name] = (st.st_size, f"mtime:{st.st_mtime_ns}")
        return out
    fs, inner = filesystem(directory)
    try:
        entries = fs.ls(inner, detail=True, refresh=True)
    except FileNotFoundError:
        return {}
    files = [e for e in entries if e.get("type") != "directory"]
    # an HTTP folder page lists names without sizes: each such file is asked for its own (one HEAD)
    return {posixpath.basename(e["name"].rstrip("/")): info_identity(e if e.get("size") is not None else fs.info(e["name"]))
            for e in files}


def remove(target: str) -> None:
    path = local_path(target)
    if path is not None:
        if os.path.exists(path):
            os.unlink(path)
        return
    fs, inner = filesystem(target)
    fs.rm_file(inner)
