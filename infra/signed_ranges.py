"""Ranged GETs of object-store files through signed URLs: the cheap way to read one group at a time.

The offline reader fetches every group with its own ranged GET (the global shuffle). Through the
filesystem's own client (s3fs on aiobotocore) each GET costs about 1.2 ms of client CPU (request
signing, request objects, the event loop), a tenth of what decoding a paper-size group (10 PNGs of
256 px) costs and as much as decoding a small one, and it holds the interpreter lock the decoding
needs. Here each object is signed once,
by the same filesystem and so with the same credentials, endpoint and region (an s3:// presigned GET
URL, Signature Version 4, valid for :data:`SIGNED_FOR_S` seconds and signed again before it expires),
and every range of it is then a plain HTTP GET with a ``Range`` header on a pooled keep-alive
connection (urllib3, one thread per request in flight): about 0.4 ms each
(benchmarks/RESULTS.md, "Read rate per worker, direct GETs, three stores"). A URL is signed for
:data:`SIGNED_FOR_S`; credentials that expire sooner (a short STS session) make the store refuse it,
and the process then reads through the filesystem.

``http(s)://`` URLs are read the same way (the URL itself, no signing). Every other scheme, and
every object once a direct GET was refused (401/403/400: a store that wants something the filesystem
adds, e.g. requester-pays or SSE-C headers) or could not connect (a proxy, a private CA), is read
through the filesystem (:func:`infra.storage.read_ranges`); such a refusal is logged once and the
process keeps to the filesystem for that scheme. A missing object is ``FileNotFoundError`` and a
range past its end a short read, exactly as through the filesystem.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from infra import storage

log = logging.getLogger("infra.signed_ranges")

#: lifetime of a signed URL; it is signed again when less than a tenth of this is left
SIGNED_FOR_S = 3600
#: schemes read through direct GETs: s3 signs a URL per object, http(s) URLs are used as they are
DIRECT_SCHEMES = ("s3", "s3a", "http", "https")
#: statuses that say "not with a direct GET": the rest of the process reads through the filesystem
REFUSED = (400, 401, 403, 405, 501)


class _Refused(Exception):
    """A direct GET the store would not serve (its status or connection error in the text)."""


class SignedRanges:
    """Reads ``(url, start, end)`` ranges, ``concurrency`` at once, with one ranged GET each.

    Args:
        concurrency: GETs in flight (threads and pooled connections).
        enabled: ``False`` reads everything through the filesystem (``storage.read_ranges``).
    """

    def __init__(self, concurrency: int = 32, enabled: bool = True) -> None:
        self.concurrency = max(1, int(concurrency))
        self.enabled = bool(enabled) and not _proxied()
        self._refused: set[str] = set()  # schemes whose direct GETs were refused in this process
        self._signed: dict[str, tuple[str, float]] = {}  # url -> (signed URL, when it was signed)
        self._lock = threading.Lock()
        self._pool: Any = None
        self._threads: ThreadPoolExecutor | None = None
        self.direct_ranges = 0  # ranges answered by direct GETs (the rest went through the filesystem)

    @property
    def refused(self) -> frozenset[str]:
        """The schemes whose direct GETs were refused; this reader sends them through the filesystem."""
        return frozenset(self._refused)

    def read(self, ranges: list[tuple[str, int, int]]) -> list[bytes | BaseException]:
        """Bytes ``[start, end)`` of each range (all URLs of one store); a range that failed maps to
        its exception (``FileNotFoundError`` for a missing object)."""
        if not ranges:
            return []
        scheme = storage.scheme_of(ranges[0][0]) or ""
        if not self.enabled or scheme not in DIRECT_SCHEMES or scheme in self._refused:
            return storage.read_ranges(ranges)
        try:
            threads = self._start()
            found = list(threads.map(self._get, ranges))
            self.direct_ranges += len(found)
            return found
        except _Refused as exc:
            with self._lock:
                if scheme not in self._refused:
                    self._refused.add(scheme)
                    log.warning("direct ranged GETs of %s:// refused (%s); reading through the filesystem from now on",
                                scheme, exc)
            return storage.read_ranges(ranges)

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._threads = None
        if self._pool is not None:
            self._pool.clear()
            self._pool = None

    # ------------------------------------------------------------------ internals
    def _start(self) -> ThreadPoolExecutor:
        if self._threads is None:
            import urllib3

            ca_bundle = os.environ.get("AWS_CA_BUNDLE") or os.environ.get("REQUESTS_CA_BUNDLE")
            self._pool = urllib3.PoolManager(maxsize=self.concurrency, retries=urllib3.Retry(2, redirect=0),
                                             timeout=urllib3.Timeout(connect=10, read=60),
                                             **({"ca_certs": ca_bundle} if ca_bundle else {}))
            self._threads = ThreadPoolExecutor(self.concurrency, thread_name_prefix="signed-ranges")
        return self._threads

    def _url(self, url: str) -> str:
        scheme = storage.scheme_of(url)
        if scheme in ("http", "https"):
            return url
        now = time.monotonic()
        with self._lock:
            cached = self._signed.get(url)
        if cached is not None and now - cached[1] < 0.9 * SIGNED_FOR_S:
            return cached[0]
        try:
            signed = _presign_s3(url)
        except Exception as exc:  # noqa: BLE001 - a filesystem that cannot sign: read through it instead
            raise _Refused(f"cannot sign {url}: {storage.describe_failure(exc)}") from exc
        with self._lock:
            self._signed[url] = (signed, now)
        return signed

    def _get(self, item: tuple[str, int, int]) -> bytes | BaseException:
        import urllib3

        url, start, end = item
        if end <= start:
            return b""
        finished = False  # the body was read to its end: the connection goes back to the pool
        try:
            response = self._pool.request("GET", self._url(url), headers={"Range": f"bytes={start}-{end - 1}"},
                                          preload_content=False, redirect=False)
            try:
                status = response.status
                if status == 206:  # the range; one byte more than asked says the store sent something else
                    data = response.read(end - start + 1)
                    finished = len(data) <= end - start
                    return data if finished else OSError(f"{url}: more than the {end - start} bytes asked for at {start}")
                if status == 200:  # the store ignored Range: read up to the range's end only, never the whole object
                    return response.read(end)[start:end]
                if status == 404:
                    return FileNotFoundError(f"{url}: not found")
                if status == 416:  # range starts past the end: a short read, as through the filesystem
                    return b""
                if status in REFUSED or 300 <= status < 400:
                    raise _Refused(f"HTTP {status} for {url}")
                return OSError(f"{url}: HTTP {status} for bytes {start}-{end - 1}")
            finally:
                if finished:
                    response.release_conn()
                else:  # a body left unread is not drained: its connection is closed
                    response.close()
        except urllib3.exceptions.HTTPError as exc:
            raise _Refused(f"{storage.scheme_of(url)}://{urllib3.util.parse_url(url).host}: {type(exc).__name__}") from exc


def _presign_s3(url: str) -> str:
    """A presigned GET URL of the s3:// object ``url``, signed by its filesystem's own client (its
    credentials, endpoint and the bucket's region) with Signature Version 4."""
    fs, inner = storage.filesystem(url)
    config = dict(fs.storage_options.get("config_kwargs") or {})
    if config.get("signature_version") != "s3v4":
        config["signature_version"] = "s3v4"
        fs = type(fs)(**{**fs.storage_options, "config_kwargs": config})  # fsspec caches this instance
    return fs.url(inner, expires=SIGNED_FOR_S)


def _proxied() -> bool:
    """Whether the environment routes HTTP through a proxy (the filesystem's clients honour it; the
    direct GETs here would not, so they are not used)."""
    return bool({k for k in urllib.request.getproxies() if k in ("http", "https")})
