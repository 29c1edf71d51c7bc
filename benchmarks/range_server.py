"""A read-only HTTP store that answers ranged GETs in time proportional to the range, as object stores
do: Python's ``http.server`` with ``Range: bytes=a-b`` (``206``), which ``http.server`` alone lacks.

``python -m benchmarks.range_server PORT FOLDER`` serves ``FOLDER`` on 127.0.0.1 (``stablerep-bench
offline`` runs it in its own process); tests/http_server.py runs the same handler in a thread.
"""
from __future__ import annotations

import functools
import os
import re
import sys
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class RangeHandler(SimpleHTTPRequestHandler):
    """Files and folder listings of ``directory``; a ranged GET of a file gets its bytes ``[a, b]``."""

    protocol_version = "HTTP/1.1"  # keep-alive, as stores serve
    refuse_user_agent: str | None = None  # ranged GETs from clients whose User-Agent starts with this get 403
    #: how a ranged GET is answered: "range" (206, the bytes asked for), "whole" (200, the whole file, as a
    #: server that ignores Range does) or "overlong" (206 with one byte more than asked: a broken store)
    answer = "range"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        match = RANGE.match(self.headers.get("Range", ""))
        if match is not None and self.refuse_user_agent and self.headers.get("User-Agent", "").startswith(self.refuse_user_agent):
            self.send_error(403)
            return
        path = self.translate_path(self.path)
        if match is None or not os.path.isfile(path) or self.answer == "whole":
            return super().do_GET()
        size = os.path.getsize(path)
        start = int(match.group(1))
        end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
        if start >= size:
            self.send_error(416)
            return
        with open(path, "rb") as handle:
            handle.seek(start)
            data = handle.read(end - start + 1 + (self.answer == "overlong"))
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def serve(port: int, folder: str, refuse_user_agent: str | None = None, answer: str = "range") -> ThreadingHTTPServer:
    """A server of ``folder`` on ``port`` of 127.0.0.1 (0: a free one), not yet serving; see
    :class:`RangeHandler` for ``refuse_user_agent`` and ``answer``."""
    handler = type("Handler", (RangeHandler,), {"refuse_user_agent": refuse_user_agent, "answer": answer})
    server = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(handler, directory=folder))
    server.daemon_threads = True
    return server


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2]).serve_forever()
