"""Checks before the first step: data that exists, a memory estimate, and the CPU guard.

* :func:`check_data_paths` runs before the config's own checks, so an empty or missing data folder
  (or a monitor probe folder without train/ and val/) is the error a user sees (not a warmup length
  derived from it).
* :func:`estimate_memory` gives a rough peak memory of one training process: weights, gradients,
  AdamW moments and the activations of one local batch (a ViT keeps about ``ACT_FLOATS_PER_TOKEN``
  floats per token, width unit and block for backward).
* :func:`check_cpu_scale` refuses paper-scale settings on a CPU unless ``--force`` is given.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from infra import storage
from trainer.config import ConfigError, TrainConfig

#: floats per (token x width x block) kept for backward in a pre-norm ViT block (attention + MLP)
ACT_FLOATS_PER_TOKEN = 34
#: on a CPU, refuse above this many model parameters (ViT-S is 22 M, ViT-B 86 M) ...
CPU_MAX_PARAMS = 30_000_000
#: ... or above this many images per process and step
CPU_MAX_IMAGES_PER_STEP = 1024
#: or an estimated peak memory above this share of the machine's memory
CPU_MAX_MEMORY_SHARE = 0.8


def check_data_paths(cfg: TrainConfig) -> None:
    """Offline source: every ``data.data`` entry exists and at least one holds data files; every
    ``monitor.dirs`` entry is a probe folder (train/ and val/ with the same >= 2 classes)."""
    _check_offline_data(cfg)
    check_probe_folders(cfg.monitor.dirs)


def check_probe_folders(dirs: list[str]) -> None:
    """Raise ``ConfigError`` naming the first probe folder without the train/val layout, or two of one name."""
    from trainer.eval.imagefolder import ImageFolderError, scan_probe_folder

    names: dict[str, str] = {}
    for entry in dirs:
        try:
            probe = scan_probe_folder(entry)
        except ImageFolderError as err:
            raise ConfigError(f"config field monitor.dirs = {entry!r}: {err}") from None
        if probe.name in names:
            raise ConfigError(f"config field monitor.dirs = {entry!r}: the probe name {probe.name!r} is also "
                              f"{names[probe.name]!r} (probes are named after their folder)")
        names[probe.name] = entry


def _check_offline_data(cfg: TrainConfig) -> None:
    if cfg.data.source != "offline" or not cfg.data.data:
        return
    found = False
    for entry in cfg.data.data:
        if storage.is_remote(entry):
            check_remote_data(entry)
            found = True
            continue
        path = Path(storage.local_path(entry) or entry)
        if not path.exists():
            raise ConfigError(f"config field data.data = {entry!r}: no such file or directory")
        if path.is_file() or any(p.is_file() for p in path.rglob("*")):
            found = True
    if not found:
        raise ConfigError(
            f"config field data.data = {cfg.data.data!r}: empty, no shard files in it (write shards with "
            "`stablerep-generator --captions FILE --out DIR`)"
        )
    from trainer.data.sources.offline_layout import check_uniform, manifest_inputs

    try:
        inputs = manifest_inputs(cfg.data.data)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"config field data.data = {cfg.data.data!r}: {exc}") from None
    check_uniform(inputs, cfg.data.draw_per_caption, cfg.data.allow_mixed)


def check_remote_data(url: str) -> None:
    """A ``--data`` URL is readable: its scheme has a filesystem, and its manifest (or first tar)
    can be read. Raises ``ConfigError`` with one line naming the URL and the cause."""
    import braceexpand

    from protocol.shards import ShardLayoutError, read_manifest

    field_name = f"config field data.data = {url!r}"
    try:
        if "{" in url or url.endswith(".tar"):
            first = next(iter(braceexpand.braceexpand(url)))
            if not storage.exists(first):
                raise ConfigError(f"{field_name}: {first} not found")
        elif read_manifest(url) is None:
            bucket = "/".join(url.split("/")[:3])  # scheme://bucket
            if not storage.exists(bucket):
                raise ConfigError(f"{field_name}: bucket {bucket} not found")
            raise ConfigError(f"{field_name}: no {storage.join(url, 'manifest.json')} (a shard set written by "
                              "stablerep-generator --out URL; plain tars: give a brace pattern of .tar URLs)")
    except ConfigError:
        raise
    except (storage.StorageError, ShardLayoutError) as exc:
        raise ConfigError(f"{field_name}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - missing bucket, credentials, unreachable endpoint: one line
        raise ConfigError(f"{field_name}: {storage.describe_failure(exc)}") from None


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    weights_gib: float  # weights + gradients + two AdamW moments (fp32)
    activations_gib: float  # one local batch, kept for backward (2 bytes a float under bf16/fp16 autocast)
    batch_gib: float  # the uint8 batch and its float crops

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.activations_gib + self.batch_gib

    def line(self) -> str:
        return (f"memory estimate per process: {_size(self.total_gib)} (model {self.params / 1e6:.2f} M params: "
                f"weights+grads+AdamW {_size(self.weights_gib)}, activations {_size(self.activations_gib)}, "
                f"batch {_size(self.batch_gib)})")


def _size(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.0f} MiB"


def estimate_memory(cfg: TrainConfig, model: torch.nn.Module, world_size: int) -> MemoryEstimate:
    """Rough peak memory of one process for ``model`` under ``cfg``: fp32 weights, gradients and AdamW
    moments; activations in 2 bytes under bf16/fp16 autocast (``run.precision``), else 4."""
    params = sum(p.numel() for p in model.parameters())
    weights = params * 4 * 4
    images = cfg.images_per_step() // max(world_size, 1)
    crop = cfg.crop_size()
    backbone = getattr(model, "backbone", model)
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", (16, 16))
    patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
    tokens = (crop // max(patch, 1)) ** 2 + 1
    width = int(getattr(backbone, "embed_dim", 384))
    depth = len(getattr(backbone, "blocks", [])) or 12
    act_bytes = 2 if cfg.run.precision in ("bf16", "fp16") else 4
    activations = images * tokens * width * depth * ACT_FLOATS_PER_TOKEN * act_bytes
    stored = cfg.data.image_size or crop
    batch = images * (stored * stored * 3 + crop * crop * 3 * 4)
    gib = float(1 << 30)
    return MemoryEstimate(params=params, weights_gib=weights / gib, activations_gib=activations / gib,
                          batch_gib=batch / gib)


def machine_memory_gib() -> float | None:
    try:
        import psutil

        return psutil.virtual_memory().total / float(1 << 30)
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        return None


def check_cpu_scale(cfg: TrainConfig, estimate: MemoryEstimate, device: torch.device, world_size: int,
                    force: bool) -> None:
    """Raise ``ConfigError`` when settings this large would train on a CPU (unless ``force``)."""
    if device.type != "cpu" or force:
        return
    images = cfg.images_per_step() // max(world_size, 1)
    memory = machine_memory_gib()
    reasons = []
    if estimate.params > CPU_MAX_PARAMS:
        reasons.append(f"a {estimate.params / 1e6:.0f} M-parameter model ({cfg.model.name})")
    if images > CPU_MAX_IMAGES_PER_STEP:
        reasons.append(f"{images} images per step and process")
    if memory is not None and estimate.total_gib > CPU_MAX_MEMORY_SHARE * memory:
        reasons.append(f"an estimated {estimate.total_gib:.1f} GiB on a machine with {memory:.1f} GiB")
    if reasons:
        raise ConfigError(
            f"paper-scale settings on a CPU: {', '.join(reasons)}. Use --preset cpu_small (or --preset demo) "
            "for a run that finishes in minutes on a CPU, or add --force to train these settings anyway"
        )
