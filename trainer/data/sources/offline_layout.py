"""Where offline caption groups live on disk: the three layouts the offline source reads.

Every input resolves to a list of *parts*, the unit that is shuffled per epoch and split across
ranks and DataLoader workers:

- generator shards: ``DIR`` holding ``manifest.json`` (only the shards it lists are complete), a
  brace pattern ``DIR/shard-{000000..000009}.tar`` or a single ``.tar``: one part per shard;
- plain image-text WebDataset shards (``KEY.jpg`` + ``KEY.txt``, as img2dataset writes them): same as
  above, given as a pattern or ``.tar`` paths (the sample format is recognized per sample);
- the official StableRep layout: a CSV of ``relative/path.jpg,caption`` rows plus one image folder
  per seed (``root/seed0/``, ``root/seed1/``, ...), or any list of folders given explicitly (the
  official ``--folder_list``, e.g. ``ddim_2.0_seed_0/``); given as the CSV path or as ``root`` holding
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

from infra import storage
from protocol.shards import IMAGE_EXTENSIONS as SHARD_IMAGE_EXTENSIONS
from protocol.shards import MANIFEST_NAME, ShardLayoutError, read_manifest
from trainer.config_checks import ConfigError
from trainer.data.sources.caption_ids import file_digest, text_digest

IMAGE_EXTENSIONS = tuple(f".{ext}" for ext in SHARD_IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class TarPart:
    """One tar shard; ``expected_groups`` comes from the manifest when there is one."""

    path: str
    expected_groups: int | None = None
    namespace: str = ""  # caption-id namespace of the input (trainer.data.sources.caption_ids)


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
    namespace: str = ""  # "csv:" + digest of the file's bytes


@dataclass(frozen=True)
class InputInfo:
    """What one ``--data`` entry says about its groups (``None``: it does not say)."""

    name: str
    image_size: int | None = None
    images_per_group: int | None = None


@dataclass
class ResolvedData:
    parts: list[Part]
    tables: list[OfficialTable]
    image_size: int | None  # the generator's save size when a manifest says it
    layouts: list[str]
    inputs: list[InputInfo] = field(default_factory=list)


def check_uniform(inputs: Sequence[InputInfo], draw_per_caption: int, allow_mixed: bool) -> None:
    """Refuse what would silently change what is trained.

    Raises:
        ConfigError: an input stores fewer images per group than ``draw_per_caption`` (every group
            would pair an image with itself), or, unless ``allow_mixed``, two inputs differ in image
            size or images per group (both named, with their values).
    """
    for info in inputs:
        if info.images_per_group is not None and info.images_per_group < draw_per_caption:
            raise ConfigError(f"{info.name} stores {info.images_per_group} image(s) per group, fewer than "
                             f"draw_per_caption = {draw_per_caption} (a group cannot give that many distinct images)")
    if allow_mixed:
        return
    for field_name, label in (("image_size", "image size"), ("images_per_group", "images per group")):
        known = [(info.name, getattr(info, field_name)) for info in inputs if getattr(info, field_name) is not None]
        for name, value in known[1:]:
            if value != known[0][1]:
                raise ConfigError(f"mixed offline inputs: {known[0][0]} has {label} {known[0][1]}, {name} has {value} "
                                 f"(pass --allow-mixed-data to train on both)")


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
    table = OfficialTable(csv_path=str(csv_path), seed_dirs=list(seed_dirs), namespace=f"csv:{file_digest(str(csv_path))}")
    with open(csv_path, newline="", encoding="utf-8") as handle:
        for line_number, row in enumerate(csv.reader(handle), start=1):
            if len(row) >= 2 and row[0].lower().endswith(IMAGE_EXTENSIONS):
                table.rows.append((row[0], row[1]))
            elif row and line_number > 1:
                raise ValueError(f"{csv_path}:{line_number}: expected 'relative/image.jpg,caption', got {row!r}")
    if not table.rows:
        raise ValueError(f"{csv_path}: no 'path,caption' rows with an image path")
    return table


def manifest_parts(directory: str | Path) -> tuple[list[TarPart], InputInfo]:
    """The complete shards listed in ``directory``'s manifest (a path or URL) and what it says about them.

    A listed shard missing from a local folder is an error here; one missing from an object store is
    counted and skipped when the index is built (it may vanish mid-run too)."""
    directory = os.fspath(directory)
    try:
        manifest = read_manifest(directory, with_ids=False)
    except ShardLayoutError as exc:
        raise ValueError(str(exc)) from None
    if manifest is None:
        raise FileNotFoundError(f"{storage.join(directory, MANIFEST_NAME)} not found")
    parts = []
    namespace = f"shards:{manifest.fingerprint}:{manifest.run.get('captions_digest', '')}"
    remote = storage.is_remote(directory)
    for record in manifest.shards:
        path = storage.join(directory, record.name)
        if not remote and not os.path.isfile(path):
            raise FileNotFoundError(f"shard {path} is listed in {storage.join(directory, MANIFEST_NAME)} but does not exist")
        parts.append(TarPart(path, record.groups, namespace))
    per_group = manifest.generator.images_per_group if manifest.generator is not None else None
    if per_group is None and isinstance(manifest.run.get("images_per_group"), int):
        per_group = manifest.run["images_per_group"]
    return parts, InputInfo(directory, manifest.save_size, per_group)


def manifest_inputs(entries: Sequence[str]) -> list[InputInfo]:
    """What the manifests among ``--data`` entries (shard folders or URLs) say about their groups."""
    out = []
    for entry in entries:
        text = os.fspath(entry)
        if "{" in text or text.endswith((".tar", ".csv")):
            continue
        local = storage.local_path(text)
        if local is not None and not (Path(local) / MANIFEST_NAME).is_file():
            continue
        out.append(manifest_parts(local if local is not None else text)[1])
    return out


def _expand_tars(pattern: str) -> list[TarPart]:
    paths = list(braceexpand.braceexpand(pattern))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"shard(s) of {pattern!r} not found: {shown}")
    namespace = "tars:" + text_digest(sorted(os.path.realpath(p) for p in paths))
    return [TarPart(p, namespace=namespace) for p in paths]


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
        if storage.is_remote(text):
            _add_remote(resolved, text)
            continue
        text = storage.local_path(text) or text
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
                parts, info = manifest_parts(path)
                resolved.parts += parts
                resolved.image_size = resolved.image_size or info.image_size
                resolved.inputs.append(info)
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


def _add_remote(resolved: ResolvedData, url: str) -> None:
    """A URL entry: a shard set with a manifest, a brace pattern or one ``.tar`` (no CSV layout)."""
    try:
        if "{" in url or url.endswith(".tar"):
            paths = list(braceexpand.braceexpand(url))
            namespace = "tars:" + text_digest(sorted(paths))
            resolved.parts += [TarPart(p, namespace=namespace) for p in paths]
            resolved.layouts.append("tar")
            return
        parts, info = manifest_parts(url)
    except storage.StorageError:
        raise
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{url}: {exc}") from None
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the store is one line naming the URL
        raise storage.StorageError(f"{url}: {storage.describe_failure(exc)}") from None
    resolved.parts += parts
    resolved.image_size = resolved.image_size or info.image_size
    resolved.inputs.append(info)
    resolved.layouts.append("manifest")


def part_namespace(part: Part, tables: Sequence[OfficialTable]) -> str:
    """The caption-id namespace of the input ``part`` belongs to."""
    return part.namespace if isinstance(part, TarPart) else tables[part.table].namespace


def describe(part: Part, tables: Sequence[OfficialTable]) -> str:
    """Human-readable name of a part, for warnings."""
    if isinstance(part, TarPart):
        return part.path
    return f"{tables[part.table].csv_path} rows {part.start}..{part.stop - 1}"
