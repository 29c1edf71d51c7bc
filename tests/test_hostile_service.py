"""A hostile *service* against a real ``stablerep-train`` (``trainer.cli.main`` in-process): a raw
ROUTER on 127.0.0.1 that answers the trainer's hello with a welcome of its choosing and spends the
trainer's credit on groups that pass (or fail) the wire checks but cannot be stored. The trainer
must skip every such group, answer it with ``error``, give its credit back and finish its steps; a
welcome it cannot use must end it with one line and exit 1 or 2."""
from __future__ import annotations

import io
import struct
import threading
import zlib
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from PIL import Image

from protocol import Credit, Error, Group, Hello, Welcome, decode, encode
from tests.train_helpers import generator_info
from trainer import cli
from trainer.data.config import DataConfig

M, SIDE = 4, 32
INFO = generator_info(M, SIDE)


def _png(side: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 90, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _bomb_png(side: int = 30000) -> bytes:
    """A PNG whose header announces side x side pixels (2.7 GB decoded) in a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _good(i: int) -> list:
    images = np.full((M, SIDE, SIDE, 3), (i * 37) % 256, np.uint8)
    return encode(Group(group_id=f"good-{i:05d}", caption_id=i, caption=f"caption {i}", seeds=list(range(M)),
                        images=images, generator=INFO.fingerprint))


def _encoded(group_id: str, frames: list[bytes], shape=(M, SIDE, SIDE, 3)) -> list:
    return encode(Group(group_id=group_id, caption_id=900, caption="bad", seeds=list(range(shape[0])),
                        encoded=frames, encoding="png", shape=shape, generator=INFO.fingerprint))


def _forged(**fields) -> list:
    """A raw group whose header fields are overridden after encoding (the codec refuses them)."""
    frames = _good(999)
    header = {**msgpack.unpackb(frames[0]), **fields}
    return [msgpack.packb(header), *frames[1:]]


def bad_groups() -> dict[str, list]:
    one_image = encode(Group(group_id="one-image", caption_id=901, caption="bad", seeds=[0],
                             images=np.zeros((1, SIDE, SIDE, 3), np.uint8), generator=INFO.fingerprint))
    return {
        "undecodable": _encoded("undecodable", [b"this is no png"] * M),
        "bomb": _encoded("bomb", [_bomb_png()] * M),
        "small": _encoded("small", [_png(16)] * M),
        "one-image": one_image,
        "huge-shape": _forged(shape=[M, 30000, 30000, 3], group_id="huge-shape"),
        "caption-id": _forged(caption_id=2**63, group_id="caption-id"),
        "long-id": _forged(group_id="x" * 5000),
    }


class HostileService:
    """A raw ROUTER: welcome ``welcome_header``; then, per credit, the next bad group until every
    bad group went out, then good groups only."""

    def __init__(self, welcome_header: dict | None = None, bad: dict[str, list] | None = None) -> None:
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.welcome_header = welcome_header
        # every bad group first: training cannot end before each was answered, and the good ones
        # come only on credit granted after those answers
        self.script = list((bad or {}).values())
        self.sent_bad = 0
        self.errors: list[Error] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._bad_ids = {id(frames) for frames in (bad or {}).values()}

    def __enter__(self) -> "HostileService":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.context.destroy(linger=0)

    def _serve(self) -> None:
        good = 0
        while not self._stop.is_set():
            if not self.router.poll(50):
                continue
            ident, *frames = self.router.recv_multipart()
            msg = decode(frames)
            if isinstance(msg, Hello):
                header = self.welcome_header or msgpack.unpackb(encode(Welcome("hostile", INFO, 1000, 64))[0])
                self.router.send_multipart([ident, msgpack.packb(header)])
            elif isinstance(msg, Error):
                self.errors.append(msg)
            elif isinstance(msg, Credit):
                for _ in range(msg.n):
                    if self.script:
                        frames = self.script.pop(0)
                        self.sent_bad += id(frames) in self._bad_ids
                    else:
                        frames, good = _good(good), good + 1
                    self.router.send_multipart([ident, *frames])


def _train_args(endpoint: str, output: Path, steps: int = 3) -> list[str]:
    return [
        "--preset", "cpu_small", "--generators", endpoint, "--output", str(output),
        "--img-size", "32", "--model-kwargs", "depth=1", "--head-hidden", "32", "--head-out", "16",
        "--captions-per-step", "4", "--draw-per-caption", "4", "--image-size", "32", "--replay-capacity", "16",
        "--weak-aug", "--warmup-steps", "1", "--steps", str(steps), "--connect-timeout", "30", "--sample-timeout", "60",
        "--generator-timeout", "60", "--log-with", "--no-progress", "--credits", "2",
    ]


def test_a_trainer_skips_every_group_it_cannot_store_and_finishes(tmp_path):
    """Undecodable PNGs, a decompression bomb, 16 px images where 32 were announced, 1 image where
    4 were, a 30000 px shape, ``caption_id = 2**63`` and a 5000-character ``group_id``: each is
    answered with ``error`` and skipped, its credit comes back, and training ends normally."""
    bad = bad_groups()
    with HostileService(bad=bad) as service:
        assert cli.main(_train_args(service.endpoint, tmp_path / "run")) == 0
    assert service.sent_bad == len(bad)
    assert len(service.errors) == len(bad) and all(e.code == "bad_message" for e in service.errors)
    summary = (tmp_path / "run" / "train_summary.json").read_text()
    assert f'"bad_groups": {len(bad)}' in summary


def _welcome(**generator) -> dict:
    header = msgpack.unpackb(encode(Welcome("hostile", INFO, 1000, 64))[0])
    header["generator"] = {**header["generator"], **generator}
    return header


@pytest.mark.parametrize("welcome, says", [
    ({**_welcome(), "v": 1.0}, "version"),
    (_welcome(save_size=2**31), "save_size"),
    (_welcome(images_per_group=2**20), "images_per_group"),
])
def test_a_welcome_the_trainer_cannot_use_ends_it_with_one_line(tmp_path, capsys, welcome, says):
    with HostileService(welcome_header=welcome) as service:
        code = cli.main(_train_args(service.endpoint, tmp_path / "run"))
    err = capsys.readouterr().err
    assert code in (1, 2) and says in err and "Traceback" not in err, err


def test_a_buffer_the_welcome_makes_too_large_is_refused_in_one_sentence():
    """Within the protocol's bounds (8192 px, 1024 images), a buffer sized from the welcome alone
    (no --image-size, default capacity) would take 13 TB: refused naming the sizes, no traceback."""
    from trainer.data.sources.online import OnlineSource

    with HostileService(welcome_header=_welcome(save_size=8192, images_per_group=1024)) as service:
        with pytest.raises(ValueError, match=r"replay buffer of 64 groups x 1024 images of 8192x8192 .* cannot be allocated"):
            OnlineSource(DataConfig(generators=[service.endpoint], draw_per_caption=4, connect_timeout=30),
                         captions_per_rank=4)
