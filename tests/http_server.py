"""A read-only HTTP store for tests: Python's ``http.server`` on 127.0.0.1 serving a folder in a
thread, with the ``Range: bytes=a-b`` requests object stores and CDNs answer (``206``)
(:mod:`benchmarks.range_server`'s handler)."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from benchmarks.range_server import serve


@contextmanager
def http_store(root: Path, refuse_user_agent: str | None = None, answer: str = "range") -> Iterator[str]:
    """Serve ``root`` on a free port of 127.0.0.1; yields its base URL (``http://127.0.0.1:PORT``).
    ``refuse_user_agent``: ranged GETs of clients whose User-Agent starts with it are answered 403
    (a store that serves one client and not another); ``answer``: how ranged GETs are answered
    (``range``, ``whole`` or ``overlong``, :class:`benchmarks.range_server.RangeHandler`)."""
    server = serve(0, str(root), refuse_user_agent, answer)
    thread = threading.Thread(target=server.serve_forever, name="http-store", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)
