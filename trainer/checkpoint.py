"""Crash-safe checkpoints of a training run.

Layout of ``OUTPUT/checkpoints/last/``:

- what ``accelerator.save_state`` writes: model weights, optimizer state, grad scaler, and one
  ``random_states_{rank}.pkl`` per process (python, numpy, torch and CUDA RNG);
- ``trainer_state.json``: step, images seen, the resolved config, the loss and lr of the last
  step, the main process's source counters (replay reuse, staleness, stall, ...) and source state
  (as JSON, for reading), and where the RNG states are;
- ``source_state_{rank}.json``: each process's ``source.state_dict()`` as JSON (plain data only,
  so a tampered checkpoint cannot run code; an older ``source_state_{rank}.pt`` is read with
  ``torch.load(weights_only=True)`` or refused). A state marked ``"layout_independent": true`` (the
  offline source) is resumed from the states of all ranks together, on any number of processes:
  every process then gets ``{"ranks": [state of rank 0, rank 1, ...]}``.

A checkpoint is written into ``checkpoints/.last.tmp`` and only then swapped in: ``last`` is
renamed to ``.last.prev``, ``.last.tmp`` to ``last``, and ``.last.prev`` deleted. A kill at any
moment leaves either a complete ``last`` or (killed between the two renames) a complete
``.last.prev``, which :func:`find_checkpoint` falls back to; a torn ``.last.tmp`` is never read.
The backbone is exported next to it as ``OUTPUT/backbone.safetensors`` + ``backbone.json``.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.json"
LAST, TMP, PREV = "last", ".last.tmp", ".last.prev"


def checkpoint_dir(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def _jsonable(value: Any) -> Any:
    """Best-effort conversion of stats to JSON (tensors and numpy scalars become numbers)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def save_checkpoint(
    accelerator,
    output: str | Path,
    *,
    step: int,
    trainer_state: dict[str, Any],
    source_state: Any,
    model,
) -> Path:
    """Save the full training state as ``OUTPUT/checkpoints/last``; call on every process.

    ``model`` is the unwrapped model; the main process exports its backbone into ``OUTPUT``.
    Returns the path of the checkpoint.
    """
    root = checkpoint_dir(output)
    tmp, last, prev = root / TMP, root / LAST, root / PREV
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    with open(tmp / f"source_state_{accelerator.process_index}.json", "w", encoding="utf-8") as fh:
        json.dump(source_state, fh, default=_plain)
    accelerator.wait_for_everyone()  # every rank's files are in tmp
    if accelerator.is_main_process:
        state = dict(trainer_state, step=step, world_size=accelerator.num_processes, saved_at=time.time())
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as fh:
            json.dump(_jsonable(state), fh, indent=2)
        if prev.exists():
            shutil.rmtree(prev)
        if last.exists():
            last.rename(prev)
        tmp.rename(last)
        if prev.exists():
            shutil.rmtree(prev)
        model.export_backbone(Path(output))
    accelerator.wait_for_everyone()
    return last


def find_checkpoint(resume: str | None, output: str | Path) -> Path | None:
    """Resolve ``--resume``: ``None`` -> no resume; ``"auto"`` -> ``OUTPUT/checkpoints/last`` if
    there is one (or the ``.last.prev`` left by a kill mid-swap), else ``None``; any other value
    must be a checkpoint directory holding ``trainer_state.json``."""
    if not resume:
        return None
    if resume == "auto":
        return _latest_in_run(output)
    path = Path(resume)
    if path.is_dir() and not (path / STATE_FILE).is_file():
        path = _latest_in_run(path) or path  # a run directory was given
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume}: no checkpoint there ({path / STATE_FILE} does not exist)")
    return path


def _latest_in_run(output: str | Path) -> Path | None:
    root = checkpoint_dir(output)
    for name in (LAST, PREV):
        if (root / name / STATE_FILE).is_file():
            return root / name
    return None


def load_checkpoint(accelerator, path: str | Path) -> tuple[dict[str, Any], Any]:
    """Restore model, optimizer and RNG state from ``path`` (on every process).

    Returns ``(trainer_state, source_state)``; ``source_state`` is this process's saved source
    state, or ``None`` when the checkpoint was written by a run with fewer processes; for a
    layout-independent source, ``{"ranks": [every rank's state]}`` (see the module docstring).
    """
    path = Path(path)
    state = _read_json(path / STATE_FILE, "trainer state")
    if not isinstance(state, dict):
        raise ValueError(f"{path / STATE_FILE}: not a readable trainer state (a JSON object expected, got "
                         f"{type(state).__name__})")
    accelerator.load_state(str(path))
    return state, load_source_state(path, accelerator.process_index)


def load_source_state(path: str | Path, process_index: int) -> Any:
    """The source state process ``process_index`` resumes from (see :func:`load_checkpoint`)."""
    path = Path(path)
    first = _load_source_state(path / "source_state_0")
    if isinstance(first, dict) and first.get("layout_independent"):
        ranks = [first]
        while (path / f"source_state_{len(ranks)}.json").is_file():
            ranks.append(_load_source_state(path / f"source_state_{len(ranks)}"))
        return {"ranks": ranks}
    return _load_source_state(path / f"source_state_{process_index}")


def _read_json(path: Path, what: str) -> Any:
    """A checkpoint's JSON file; ``ValueError`` naming the file for anything unreadable, nesting
    too deep for the parser included."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise ValueError(f"{path}: not a readable {what} ({reason})") from None


def _plain(value: Any) -> Any:
    """JSON for the numpy / torch scalars and arrays a source state may hold; anything else is an error."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)) or type(value).__name__ == "deque":
        return list(value)
    raise TypeError(f"source state holds a {type(value).__name__}, which a checkpoint does not store")


def _load_source_state(stem: Path) -> Any:
    """This process's source state (``None`` when the run that saved it had fewer processes)."""
    json_file, legacy = stem.with_suffix(".json"), stem.with_suffix(".pt")
    if json_file.is_file():
        return _read_json(json_file, "source state")
    if legacy.is_file():
        try:
            return torch.load(legacy, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any refusal is reported the same way
            raise ValueError(
                f"{legacy}: refused to load (only plain tensors and containers are accepted, nothing that "
                f"runs code): {type(exc).__name__}: {exc}"
            ) from None
    return None
