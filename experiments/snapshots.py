"""Backbone snapshots of a run: ``OUTPUT/snapshots/step-NNNNNN/`` (N = optimizer steps behind the
backbone, 0 = the random init), each a ``backbone.json`` + ``backbone.safetensors`` pair.
"""
from __future__ import annotations

import shutil
from pathlib import Path

SNAPSHOTS = "snapshots"


def find_snapshots(snapshot_dir: Path) -> dict[int, Path]:
    """step -> folder of every complete snapshot (``backbone.safetensors`` present) under ``snapshot_dir``."""
    found: dict[int, Path] = {}
    for folder in sorted(Path(snapshot_dir).glob("step-*")):
        try:
            step = int(folder.name.split("-", 1)[1])
        except ValueError:
            continue
        if (folder / "backbone.safetensors").is_file() and (folder / "backbone.json").is_file():
            found[step] = folder
    return found


def copy_backbone(src_dir: Path, dst_dir: Path) -> Path:
    """The backbone pair exported in ``src_dir`` (a run's output), copied into the snapshot folder ``dst_dir``."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in ("backbone.json", "backbone.safetensors"):
        shutil.copy2(src_dir / name, dst_dir / name)
    return dst_dir


def export_initial_backbone(cfg, dst_dir: Path) -> Path:
    """The backbone ``train(cfg)`` starts from (same seed, same construction order), exported."""
    from accelerate.utils import set_seed

    from trainer.loop import build_components

    set_seed(cfg.run.seed)
    model = build_components(cfg)[0]
    model.export_backbone(dst_dir)
    return dst_dir
