"""CurveZMQ for protocol v1: encrypted sessions, and only clients whose public key is authorized.

A key directory (``write_keys``) holds::

    server.key          the service's public key      (trainers need it)
    server.key_secret   the service's key pair        (the service only; mode 0600)
    client.key          a trainer's public key
    client.key_secret   that trainer's key pair       (trainers only; mode 0600)
    authorized/         public keys the service accepts (``*.key``; client.key is copied here)
    trainer/            what trainers get: server.key, client.key, client.key_secret (mode 0700)

Secret key files are created in a private (0700) temporary directory, made 0600 there, and only
then moved into place: they never exist readable by others.

The service (``CurveServer``) runs ZeroMQ's ZAP handler (``zmq.auth.ThreadAuthenticator``) on
its context: a client completes the handshake only with the service's public key *and* a key pair
whose public half is in ``authorized/``. A refused client gets no message at all; the service
counts ZAP refusals (``refused``) and logs them rate-limited. A client that does not speak CURVE,
or uses another service key, fails inside ZeroMQ's handshake and is never seen by the service.
To let another trainer in, copy its ``client.key`` into ``authorized/`` under any ``NAME.key`` and
restart the service.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from infra.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

SERVER = "server"
CLIENT = "client"
AUTHORIZED = "authorized"
TRAINER = "trainer"


class CurveKeyError(ValueError):
    """A key directory is missing, incomplete or unreadable (the message names the file)."""


def write_keys(directory: str | os.PathLike) -> Path:
    """Create a fresh server and client key pair in ``directory`` (refused if keys are there already)."""
    root = Path(directory)
    existing = [p.name for p in (root / f"{SERVER}.key_secret", root / f"{CLIENT}.key_secret") if p.exists()]
    if existing:
        raise CurveKeyError(f"{root}: {', '.join(existing)} already there; keys are never overwritten "
                            "(remove them first to make new keys, then restart services and trainers)")
    (root / AUTHORIZED).mkdir(parents=True, exist_ok=True)
    trainer = root / TRAINER
    trainer.mkdir(mode=0o700, exist_ok=True)
    os.chmod(trainer, 0o700)
    private = Path(tempfile.mkdtemp(prefix=".keys-", dir=root))  # mode 0700: nobody else can open what is inside
    try:
        for name in (SERVER, CLIENT):
            public, secret = (Path(p) for p in zmq.auth.create_certificates(private, name))
            os.chmod(secret, 0o600)
            shutil.copyfile(public, trainer / public.name)
            if name == CLIENT:
                shutil.copy2(secret, trainer / secret.name)  # inside the 0700 folder; copy2 ends at mode 0600
            os.replace(public, root / public.name)
            os.replace(secret, root / secret.name)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    shutil.copyfile(root / f"{CLIENT}.key", root / AUTHORIZED / f"{CLIENT}.key")
    return root


def _load(path: Path, want_secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise CurveKeyError(f"{path}: no such key file (make a key directory with `stablerep-generator keys DIR`)")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"{path}: not a ZeroMQ certificate ({exc})") from None
    if want_secret and not secret:
        raise CurveKeyError(f"{path}: holds no secret key")
    return public, secret


def server_public_key(directory: str | os.PathLike) -> bytes:
    """The service's public key (``DIR/server.key``)."""
    return _load(Path(directory) / f"{SERVER}.key", want_secret=False)[0]


class _CountingAuthenticator(ThreadAuthenticator):
    """ZeroMQ's threaded ZAP handler, counting the handshakes it refuses."""

    def __init__(self, context: zmq.Context, log_interval_s: float = 10.0) -> None:
        super().__init__(context, log=logging.getLogger("zmq.auth"))
        self._lock = threading.Lock()
        self.refused = 0
        self.refusals = RateLimitedLog(log, "CURVE: refused a client", log_interval_s)

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes, user_id: str = "anonymous") -> None:
        if status_code != b"200":
            with self._lock:
                self.refused += 1
            self.refusals.note("unauthorized key", status_text.decode("utf-8", "replace"))
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


class CurveServer:
    """The service side: its key pair and the ZAP handler of authorized client keys.

    Args:
        directory: a key directory (``write_keys``); reads ``server.key_secret`` and ``authorized/``.
    """

    def __init__(self, directory: str | os.PathLike, log_interval_s: float = 10.0) -> None:
        self.directory = Path(directory)
        self.log_interval_s = float(log_interval_s)
        self.public_key, self.secret_key = _load(self.directory / f"{SERVER}.key_secret", want_secret=True)
        self.authorized = self.directory / AUTHORIZED
        if not self.authorized.is_dir() or not list(self.authorized.glob("*.key")):
            raise CurveKeyError(f"{self.authorized}: no authorized client keys (*.key); every client would be refused")
        self._auth: _CountingAuthenticator | None = None

    def configure(self, context: zmq.Context, socket: zmq.Socket) -> None:
        """Start the ZAP handler on ``context`` and make ``socket`` a CURVE server (before bind)."""
        if self._auth is None:
            self._auth = _CountingAuthenticator(context, self.log_interval_s)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(self.authorized))
        socket.curve_secretkey = self.secret_key
        socket.curve_publickey = self.public_key
        socket.curve_server = True

    @property
    def refused(self) -> int:
        """Clients refused so far (their public key is not in ``authorized/``)."""
        return 0 if self._auth is None else self._auth.refused

    def flush_log(self, force: bool = False) -> None:
        """Write the refusal summary when its interval is over (``force``: now); the service's I/O
        loop calls it every turn, so the last burst of refusals is summed up too."""
        if self._auth is not None:
            self._auth.refusals.flush(force=force)

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth.refusals.flush(force=True)


class CurveClient:
    """The trainer side: the service's public key and this client's key pair.

    Args:
        directory: a key directory; reads ``server.key`` and ``client.key_secret``.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.server_key = server_public_key(self.directory)
        self.public_key, self.secret_key = _load(self.directory / f"{CLIENT}.key_secret", want_secret=True)

    def configure(self, socket: zmq.Socket) -> None:
        """Make ``socket`` a CURVE client of the service (before connect)."""
        socket.curve_serverkey = self.server_key
        socket.curve_publickey = self.public_key
        socket.curve_secretkey = self.secret_key
