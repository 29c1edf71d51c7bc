"""Where offline caption groups live on disk: the three layouts the offline source reads.

Every input resolves to a list of *parts*, the unit that is shuffled per epoch and split across
ranks and DataLoader workers:

- generator shards: ``DIR`` holding ``manifest.json`` (only the shards it lists are complete), a
  brace pattern ``DIR/shard-{000000..000009}.tar`` or a single ``.tar``: one part per shard;
- plain image-text WebDataset shards (``KEY.jpg`` + ``KEY.txt``, as img2dataset writes them): same as
  above, given as a pattern or ``.tar`` paths (the sample format is recognized per sample);
- the official StableRep layout: a CSV of ``relative/path.jpg,caption`` rows plus one image folder
  per seed (``root/seed0/``, ``root/seed1/``, ...); given as the CSV path or as ``root`` holding
  exactly one CSV. Rows are cut into parts of ``rows_per_part`` rows.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import braceexpand

from protocol.shards import IMAGE_EXTENSIONS as SHARD_IMAGE_EXTENSIONS
from protocol.shards import MANIFEST_NAME, ShardLayoutError, read_manifest

IMAGE_EXTENSIONS = tuple(f".{ext}" for ext in SHARD_IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class TarPart:
    """One tar shard; ``expected_groups`` comes from the manifest when there is one."""

    path: str
    expected_groups: int | None = None


@dataclass(frozen=True)
class RowsPart:
    """Rows ``[start, stop)`` of official-layout table number ``table``."""

    table: int
    start: int
    stop: int


Part = Union[TarPart, RowsPart]


@dataclass
class OfficialTable:
    """The official layout: ``rows[i] = (relative image path, caption)``; caption id = row index."""

    csv_path: str
    seed_dirs: list[str]
    rows: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class ResolvedData:
    parts: list[Part]
    tables: list[OfficialTable]
    image_size: int | None  # the generator's save size when a manifest says it
    layouts: list[str]


def _seed_number(path: Path) -> int:
    match = re.fullmatch(r"seed(\d+)", path.name)
    return int(match.group(1)) if match else -1


def read_official_csv(csv_path: Path, seed_dirs: Sequence[str] | None = None) -> OfficialTable:
    """Read the official layout. Rows whose first field is not an image path (e.g. a header) are skipped,
    as the official loader does; seed folders default to ``seed<N>/`` next to the CSV, in N order."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"official-layout CSV not found: {csv_path}")
    if seed_dirs is None:
        found = sorted((p for p in csv_path.parent.iterdir() if p.is_dir() and _seed_number(p) >= 0), key=_seed_number)
        if not found:
            raise FileNotFoundError(f"no seed folders (seed0/, seed1/, ...) next to {csv_path} in {csv_path.parent}")
        seed_dirs = [str(p) for p in found]
    missing = [d for d in seed_dirs if not Path(d).is_dir()]
    if missing:
        raise FileNotFoundError(f"seed folder(s) of {csv_path} not found: {missing}")
    table = OfficialTable(csv_path=str(csv_path), seed_dirs=list(seed_dirs))
    with open(csv_path, newline="", encoding="utf-8") as handle:
        for line_number, row in enumerate(csv.reader(handle), start=1):
            if len(row) >= 2 and row[0].lower().endswith(IMAGE_EXTENSIONS):
                table.rows.append((row[0], row[1]))
            elif row and line_number > 1:
                raise ValueError(f"{csv_path}:{line_number}: expected 'relative/image.jpg,caption', got {row!r}")
    if not table.rows:
        raise ValueError(f"{csv_path}: no 'path,caption' rows with an image path")
    return table


def manifest_parts(directory: Path) -> tuple[list[TarPart], int | None]:
    """The complete shards listed in ``directory``'s manifest and the generator's save size."""
    try:
        manifest = read_manifest(directory)
    except ShardLayoutError as exc:
        raise ValueError(str(exc)) from None
    if manifest is None:
        raise FileNotFoundError(f"{directory / MANIFEST_NAME} not found")
    parts = []
    for record in manifest.shards:
        path = directory / record.name
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} is listed in {directory / MANIFEST_NAME} but does not exist")
        parts.append(TarPart(str(path), record.groups))
    return parts, manifest.save_size


def _expand_tars(pattern: str) -> list[TarPart]:
    paths = list(braceexpand.braceexpand(pattern))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"shard(s) of {pattern!r} not found: {shown}")
    return [TarPart(p) for p in paths]


def resolve_data(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    seed_dirs: Sequence[str] | None = None,
    rows_per_part: int = 256,
) -> ResolvedData:
    """Turn the user's ``--data`` entries into parts (see the module docstring).

    Raises:
        FileNotFoundError: a path, manifest, shard, CSV or seed folder does not exist (named).
        ValueError: an entry is of no known layout, or a manifest / CSV is malformed.
    """
    entries = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not entries:
        raise ValueError("the offline source needs at least one data path")
    resolved = ResolvedData(parts=[], tables=[], image_size=None, layouts=[])

    def add_table(csv_path: Path) -> None:
        table = read_official_csv(csv_path, seed_dirs)
        index = len(resolved.tables)
        resolved.tables.append(table)
        resolved.parts += [
            RowsPart(index, start, min(start + rows_per_part, len(table.rows)))
            for start in range(0, len(table.rows), rows_per_part)
        ]
        resolved.layouts.append("official")

    for entry in entries:
        text = os.fspath(entry)
        path = Path(text)
        if "{" in text:
            resolved.parts += _expand_tars(text)
            resolved.layouts.append("tar")
        elif text.endswith(".csv"):
            add_table(path)
        elif text.endswith(".tar"):
            resolved.parts += _expand_tars(text)
            resolved.layouts.append("tar")
        elif path.is_dir():
            if (path / MANIFEST_NAME).is_file():
                parts, save_size = manifest_parts(path)
                resolved.parts += parts
                resolved.image_size = resolved.image_size or save_size
                resolved.layouts.append("manifest")
                continue
            csvs = sorted(path.glob("*.csv"))
            if len(csvs) == 1:
                add_table(csvs[0])
                continue
            raise FileNotFoundError(
                f"{path}: no manifest.json (generator shards) and not exactly one CSV with seed*/ folders "
                f"(official StableRep layout); for plain WebDataset shards pass a pattern like "
                f"'{path}/{{00000..00009}}.tar'"
            )
        elif not path.exists():
            raise FileNotFoundError(f"offline data path not found: {path}")
        else:
            raise ValueError(f"{path}: not a directory, .tar, brace pattern or .csv")
    return resolved


def describe(part: Part, tables: Sequence[OfficialTable]) -> str:
    """Human-readable name of a part, for warnings."""
    if isinstance(part, TarPart):
        return part.path
    return f"{tables[part.table].csv_path} rows {part.start}..{part.stop - 1}"
