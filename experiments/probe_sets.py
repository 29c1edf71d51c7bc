"""Held-out labelled probe sets of the procedural generator: one ImageFolder per caption attribute
(``probe_<attribute>/{train,val}/<class>/``), written by ``stablerep-generator probe-set``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from experiments.generator_process import run_generator_cli
from infra.cli_parser import SuggestingParser


def check_attributes(parser: SuggestingParser, attributes: tuple[str, ...]) -> None:
    """``--attributes`` names procedural caption attributes only (checked before any work)."""
    from generator_service.procedural.grammar import ATTRIBUTES

    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown or not attributes:
        parser.error(f"--attributes: {', '.join(unknown) or 'none given'} (known: {', '.join(ATTRIBUTES)})")


def write_probe_sets(attributes: tuple[str, ...] | list[str], data: Path, train_per_class: int,
                     val_per_class: int, seed: int, reuse: bool = False) -> dict[str, Path]:
    """Labelled procedural probe folders ``data/probe_<attribute>/{train,val}/<class>/``, one per attribute.

    Attribute ``i`` gets seed ``seed + 1000 + i`` (so its images never equal a training image or another
    attribute's). ``reuse``: keep a folder that already has ``val/`` (the study scores many arms on
    one set); otherwise an old folder is replaced. Returns attribute -> folder.
    """
    folders: dict[str, Path] = {}
    for i, attribute in enumerate(attributes):
        folder = data / f"probe_{attribute}"
        folders[attribute] = folder
        if reuse and (folder / "val").is_dir():
            continue
        if folder.exists():
            shutil.rmtree(folder)
        run_generator_cli(["probe-set", "--out", str(folder), "--attribute", attribute,
                           "--train-per-class", str(train_per_class), "--val-per-class", str(val_per_class),
                           "--size", "64", "--seed", str(seed + 1000 + i)])
    return folders
