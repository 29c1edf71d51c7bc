"""A local TCP endpoint to bind a service to (the demo, the study and the drills start their own)."""
from __future__ import annotations

import socket


def free_tcp_endpoint(host: str = "127.0.0.1") -> str:
    """``tcp://host:PORT`` with a port the OS just reported free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return f"tcp://{host}:{sock.getsockname()[1]}"
