"""Caption sources: one loader for .txt, .csv, .tsv, .jsonl and .parquet files.

Every caption keeps a ``caption_id``: its index among the non-empty captions of the file, in file
order. Ids are therefore stable across runs, shuffles and shards, and they are what protocol v1's
``group.caption_id`` carries. Empty captions (blank lines, empty cells, nulls) are skipped and
counted in ``CaptionSet.skipped_empty``; they do not consume an id.

Order: file order, or a permutation drawn from ``seed`` (``numpy.random.default_rng(seed)``).
Sharding: shard ``(i, N)`` keeps positions ``i, i+N, i+2N, ...`` of that order, so the N shards are
disjoint and together cover every caption. The official StableRep CSV (columns ``path,caption``)
is read with the default column ``caption``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

FORMATS = (".txt", ".csv", ".tsv", ".jsonl", ".parquet")


@dataclass
class CaptionSet:
    """Captions of one file (possibly shuffled and sharded), with their stable ids."""

    path: str
    caption_ids: list[int]
    captions: list[str]
    skipped_empty: int = 0
    total: int = 0                      # non-empty captions in the whole file
    shard: tuple[int, int] = (0, 1)
    seed: int | None = None
    column: str | None = None
    lines: list[int] = field(default_factory=list, repr=False)  # caption_id -> 1-based line (.parquet: row)
    _by_id: dict[int, str] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.captions)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        """Yields ``(caption_id, caption)`` in this set's order."""
        return iter(zip(self.caption_ids, self.captions))

    def __getitem__(self, position: int) -> tuple[int, str]:
        return self.caption_ids[position], self.captions[position]

    def where(self, caption_id: int) -> str:
        """``PATH line N`` (``row N`` for .parquet) of a caption, for messages."""
        unit = "row" if Path(self.path).suffix.lower() == ".parquet" else "line"
        return f"{self.path} {unit} {self.lines[caption_id]}" if self.lines else f"{self.path} caption {caption_id}"

    def caption_of(self, caption_id: int) -> str:
        """The caption with this id (it must belong to this shard)."""
        if not self._by_id:
            self._by_id = dict(zip(self.caption_ids, self.captions))
        try:
            return self._by_id[caption_id]
        except KeyError:
            raise KeyError(f"caption_id {caption_id} is not in {self.path} shard {self.shard}") from None


def _clean(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and np.isnan(value):
        return ""
    return str(value).strip()


def _missing_column(path: Path, column: str, available: list[str]) -> ValueError:
    return ValueError(
        f"{path}: no column {column!r}; available columns: {', '.join(map(repr, available)) or '(none)'}"
    )


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; a ValueError naming the file, line and byte when it is not (e.g. binary)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column}); "
                         "caption files are UTF-8 .txt/.csv/.tsv/.jsonl or .parquet") from None


def _read_txt(path: Path) -> list[str]:
    with io.StringIO(_read_text(path), newline=None) as handle:  # universal newlines, as open() reads
        return [line.strip() for line in handle]


def _read_delimited(path: Path, column: str, delimiter: str, lines: list[int]) -> list[str]:
    """The column's cells in file order; ``lines`` gets each record's (last) line number."""
    with io.StringIO(_read_text(path), newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        header = [name.strip() for name in (reader.fieldnames or [])]
        if not header:
            raise ValueError(f"{path}: empty file (no header row, no captions)")
        reader.fieldnames = header
        if column not in header:
            raise _missing_column(path, column, header)
        cells = []
        for row in reader:  # (csv skips blank lines: the line numbers come from the reader)
            cells.append(_clean(row.get(column)))
            lines.append(reader.line_num)
        return cells


def _read_jsonl(path: Path, column: str) -> list[str]:
    captions = []
    with io.StringIO(_read_text(path), newline=None) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                captions.append("")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({exc.msg})") from exc
            if isinstance(record, str):
                captions.append(_clean(record))
            elif isinstance(record, dict):
                if column not in record:
                    raise ValueError(
                        f"{path}:{line_number}: no key {column!r}; available keys: "
                        f"{', '.join(map(repr, record)) or '(none)'}"
                    )
                captions.append(_clean(record[column]))
            else:
                raise ValueError(f"{path}:{line_number}: expected a JSON object or string, got {type(record).__name__}")
    return captions


def _read_parquet(path: Path, column: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"reading {path} needs pyarrow: pip install 'stablerep[parquet]' (or pip install pyarrow)"
        ) from exc
    names = pq.read_schema(path).names
    if column not in names:
        raise _missing_column(path, column, names)
    return [_clean(value) for value in pq.read_table(path, columns=[column]).column(column).to_pylist()]


def read_caption_column(path: str | Path, column: str = "caption") -> tuple[list[str], int]:
    """All non-empty captions of a file in file order, and the number of empty ones skipped."""
    captions, skipped, _ = _read_caption_lines(path, column)
    return captions, skipped


def _read_caption_lines(path: str | Path, column: str) -> tuple[list[str], int, list[int]]:
    """Non-empty captions in file order, empty ones skipped, and each caption's 1-based line in the
    file (.parquet: its row, the first record being row 1)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    suffix = path.suffix.lower()
    record_lines: list[int] = []
    if suffix == ".txt":
        raw = _read_txt(path)
    elif suffix in (".csv", ".tsv"):
        raw = _read_delimited(path, column, "," if suffix == ".csv" else "\t", record_lines)
    elif suffix == ".jsonl":
        raw = _read_jsonl(path, column)
    elif suffix == ".parquet":
        raw = _read_parquet(path, column)
    else:
        raise ValueError(f"{path}: unknown caption file type {suffix!r}; supported: {', '.join(FORMATS)}")
    record_lines = record_lines or list(range(1, len(raw) + 1))
    lines = [line for line, text in zip(record_lines, raw) if text]
    captions = [text for text in raw if text]
    skipped = len(raw) - len(captions)
    if not captions:
        where = "" if suffix == ".txt" else f" in column {column!r}"
        raise ValueError(f"{path}: no captions{where} ({skipped} empty entries skipped)")
    return captions, skipped, lines


def load_captions(
    path: str | Path,
    column: str = "caption",
    seed: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> CaptionSet:
    """Load, optionally shuffle (``seed``) and shard (``shard=(i, N)``) the captions of ``path``.

    ``column`` names the caption column of .csv/.tsv/.parquet files and the key of .jsonl objects
    (ignored for .txt). Raises FileNotFoundError for a missing file, ValueError for an empty file,
    an unknown column (listing the available ones), an unknown format or a bad shard.
    """
    index, count = shard
    if isinstance(index, bool) or isinstance(count, bool) or not (isinstance(index, int) and isinstance(count, int)):
        raise ValueError(f"shard must be (index, count) integers, got {shard!r}")
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count} is invalid: need count >= 1 and 0 <= index < count")
    captions, skipped, lines = _read_caption_lines(path, column)
    order = np.arange(len(captions))
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(captions))
    order = order[index::count]
    return CaptionSet(
        path=str(path),
        caption_ids=[int(i) for i in order],
        captions=[captions[i] for i in order],
        skipped_empty=skipped,
        total=len(captions),
        shard=(index, count),
        seed=seed,
        column=None if Path(path).suffix.lower() == ".txt" else column,
        lines=lines,
    )
