"""Helpers for the trainer tests: learnable synthetic caption groups, a local group server, shards.

A caption's images share a colour layout (a few random rectangles seeded by the caption id) and
differ by noise and a random shift, so a tiny ViT can learn which images belong together within a
few steps: the contrastive loss falls.
"""
from __future__ import annotations

import socket
import urllib.request
import threading
from pathlib import Path

import numpy as np

from generator_service.config import GeneratorConfig
from generator_service.shards import ShardWriter
from protocol import GeneratorInfo, Group
from protocol.server import GroupServer


def caption_images(caption_id: int, m: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 ``[m, size, size, 3]``: one caption's layout, per-image shift and noise."""
    layout_rng = np.random.default_rng(caption_id)
    base = np.zeros((size, size, 3), dtype=np.float32)
    base[:] = layout_rng.uniform(0, 255, 3)
    for _ in range(3):
        y0, x0 = layout_rng.integers(0, size // 2, 2)
        h, w = layout_rng.integers(size // 4, size // 2 + 1, 2)
        base[y0:y0 + h, x0:x0 + w] = layout_rng.uniform(0, 255, 3)
    rng = np.random.default_rng((seed, caption_id))
    out = np.empty((m, size, size, 3), dtype=np.uint8)
    for i in range(m):
        shifted = np.roll(base, tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
        out[i] = np.clip(shifted + rng.normal(0, 12, shifted.shape), 0, 255).astype(np.uint8)
    return out


def generator_config(m: int, size: int) -> GeneratorConfig:
    """The real generator config whose description the synthetic service announces."""
    return GeneratorConfig(backend="procedural", images_per_group=m, save_size=size)


def generator_info(m: int, size: int) -> GeneratorInfo:
    """The real ``welcome.generator`` of a generator storing m images of side ``size`` per group."""
    return generator_config(m, size).welcome_info()


def make_group(caption_id: int, m: int, size: int, epoch: int = 0) -> Group:
    return Group(
        group_id=f"synthetic-{caption_id:09d}-e{epoch}",
        caption_id=caption_id,
        caption=f"synthetic caption {caption_id}",
        seeds=[epoch * m + i for i in range(m)],
        images=caption_images(caption_id, m, size, seed=epoch),
        generator=generator_info(m, size).fingerprint,
    )


class SyntheticService:
    """A real ``GroupServer`` on 127.0.0.1 fed by a thread cycling over ``num_captions`` captions
    (``generator``: the config it announces, by default ``generator_config(m, size)``; ``server_options``:
    more ``GroupServer`` keyword arguments)."""

    def __init__(self, num_captions: int = 64, m: int = 4, size: int = 32, generator: GeneratorConfig | None = None,
                 **server_options) -> None:
        self.num_captions, self.m, self.size = num_captions, m, size
        self.info = generator.welcome_info() if generator is not None else generator_info(m, size)
        self.server = GroupServer("tcp://127.0.0.1:*", "synthetic-test", self.info,
                                  heartbeat_ms=200, max_queue=16, **server_options)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._feed, daemon=True)

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def _feed(self) -> None:
        i = 0
        while not self._stop.is_set():
            caption_id, epoch = i % self.num_captions, i // self.num_captions
            group = make_group(caption_id, self.m, self.size, epoch)
            group.generator = self.info.fingerprint  # the generator announced (``generator``: another one)
            while not self._stop.is_set() and not self.server.put(group, timeout=0.2):
                pass
            i += 1

    def __enter__(self) -> "SyntheticService":
        self.server.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.server.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on (it was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_tcp_endpoint() -> str:
    """An endpoint on 127.0.0.1 nobody listens on (the port was free a moment ago)."""
    return f"tcp://127.0.0.1:{free_port()}"


def scrape_metrics(url: str, timeout: float = 30.0) -> dict[str, float]:
    """Every ``stablerep_*`` sample a Prometheus endpoint serves: ``name{labels}`` -> value."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("stablerep_"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def write_shards(out: Path, num_captions: int, m: int, size: int, groups_per_shard: int = 16) -> Path:
    """Offline shards of synthetic groups, written by the generator's real ``ShardWriter``."""
    with ShardWriter(out, generator_config(m, size), shard_size=groups_per_shard) as writer:
        for caption_id in range(num_captions):
            writer.write(make_group(caption_id, m, size))
    return out


def tiny_offline_args(shards: Path, output: Path, steps: int, *extra: str) -> list[str]:
    """``stablerep-train`` flags of a tiny offline run (a one-block ViT of width 32 at 32 px, 8 captions x
    2 images per step) on ``shards`` written by :func:`write_shards` with ``size=32``."""
    return [
        "--preset", "cpu_small", "--source", "offline", "--data", str(shards), "--output", str(output),
        "--img-size", "32", "--model-kwargs", "depth=1", "embed_dim=32", "num_heads=2", "patch_size=8",
        "--head-hidden", "32", "--head-out", "16", "--captions-per-step", "8", "--draw-per-caption", "2",
        "--image-size", "32", "--steps", str(steps), "--warmup-steps", "1", "--log-with", "--num-workers", "0",
        *extra,
    ]
