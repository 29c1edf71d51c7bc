"""Checks before a run writes anything: is ``--output`` free, and does the checkpoint to resume fit?

:func:`check_run_start` runs on every process before the run folder is touched and raises
``ConfigError`` (exit 2, one line) when:

- ``OUTPUT`` already holds a run (any of :data:`RUN_MARKERS`) and neither ``--resume`` nor
  ``--overwrite`` was given, or ``--resume PATH`` names a checkpoint of another run while ``OUTPUT``
  holds one of its own;
- ``--resume PATH`` names no checkpoint, or ``--resume auto`` finds none in a folder holding
  trained files (a backbone, a summary: there is nothing to continue, and a fresh start would
  replace them);
- ``--overwrite`` would delete the checkpoint ``--resume`` names;
- the checkpoint's saved config differs from this one in what it trained: the model (name,
  keyword arguments, image size, head, text tower), the method, the data layout (source, captions
  per step, draw per caption, stored image size, crops per image) or the schedule (peak lr, warmup,
  min lr); the message names the first difference, e.g. ``checkpoint has model.model_kwargs.depth =
  4, this config 2``;
- an offline run's checkpoint read another data set: its saved source state records another sample
  count, data fingerprint (the caption-id namespaces and size) or seed than ``--data`` / ``--seed``
  give now (counted from manifests and shard indexes, no tar is read); the message names the field;
- the new ``--steps`` ends before the checkpoint's step, or ``--resume-lr continue`` would
  extend a finished schedule (whose lr has decayed to min lr) at that lr.

It also decides the lr schedule of a resumed run whose length changed (``schedule.resume_lr``):
``continue`` (default) goes on from the lr the checkpoint's schedule reached, with a new cosine
down to ``min_lr`` at the new end; ``replan`` uses the schedule of a run planned with the new
length from the start (the lr jumps to it).

``--overwrite`` deletes the old run's files (:data:`RUN_FILES`) when the new run starts writing
(:func:`clear_run`, after these checks passed), so that one folder never mixes two runs; other
files in the folder (e.g. the demo's data) stay.
"""
from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trainer.checkpoint import STATE_FILE, find_checkpoint, load_source_state
from trainer.config import ConfigError, TrainConfig, apply_overrides
from trainer.schedule import LrSchedule

#: files whose presence means OUTPUT holds a run
RUN_MARKERS = ("config.yaml", "checkpoints", "backbone.safetensors", "train_summary.json")
#: markers of a run that trained (a folder holding only config.yaml stopped before its first step)
TRAINED_MARKERS = ("checkpoints", "backbone.safetensors", "train_summary.json")
#: everything a run writes into OUTPUT (``stablerep/``: the tensorboard events); --overwrite deletes these
RUN_FILES = (*RUN_MARKERS, "backbone.json", "train.log", "curve.png", "stablerep")

#: fields whose change makes a checkpoint another model, objective or data layout
COMPARED_FIELDS = (
    "model.name", "model.model_kwargs", "model.img_size", "model.head_hidden", "model.head_out",
    "model.head_layers", "model.head_per_view", "model.text",
    "method.name", "method.temperature", "method.kwargs",
    "data.source", "data.captions_per_step", "data.draw_per_caption", "data.image_size",
    "augment.crops_per_image",
)


@dataclass
class RunStart:
    """What :func:`check_run_start` decided: the checkpoint to load (``None``: a fresh run), its
    ``trainer_state.json``, the lr schedule, and a line saying how a changed run length is handled."""

    checkpoint: Path | None
    state: dict[str, Any] | None
    schedule: LrSchedule
    note: str | None = None


def held_run_files(output: Path, names: tuple[str, ...] = RUN_MARKERS) -> list[str]:
    """The ``names`` present in ``output`` (``checkpoints/`` counts only when it holds something)."""
    found = []
    for name in names:
        path = output / name
        if path.is_dir():
            if any(path.iterdir()):
                found.append(f"{name}/")
        elif path.exists():
            found.append(name)
    return found


def clear_run(output: str | Path) -> list[str]:
    """Delete the run files of ``output`` (:data:`RUN_FILES`); returns what was deleted."""
    output = Path(output)
    removed = []
    for name in RUN_FILES:
        path = output / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            removed.append(f"{name}/")
        elif path.exists() or path.is_symlink():
            path.unlink()
            removed.append(name)
    return removed


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def check_run_start(cfg: TrainConfig) -> RunStart:
    """Decide how the run starts, before anything is written (see the module docstring)."""
    output, resume, overwrite = Path(cfg.run.output), cfg.run.resume, cfg.run.overwrite
    held = held_run_files(output)
    try:
        checkpoint = find_checkpoint(resume, output)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    if overwrite and (resume == "auto" or (checkpoint is not None and _inside(checkpoint, output))):
        raise ConfigError(f"--overwrite would delete the checkpoint --resume {resume} continues from; give "
                          f"--resume to continue the run in {output} or --overwrite to replace it, not both")
    if held and not overwrite:
        listed = ", ".join(held)
        if resume is None:
            raise ConfigError(f"--output {output} already holds a run ({listed}): give --resume auto to continue "
                              "it or --overwrite to replace it (or another --output)")
        if checkpoint is None and held_run_files(output, TRAINED_MARKERS):
            raise ConfigError(f"--resume auto: {output} holds a run ({listed}) but no checkpoint to continue; "
                              "give --overwrite to replace it (or another --output)")
        if checkpoint is not None and not _inside(checkpoint, output):
            raise ConfigError(f"--resume {resume} continues another run, but --output {output} holds a run of its "
                              f"own ({listed}): give another --output, or --overwrite to replace it")
    new_schedule = LrSchedule(cfg.peak_lr(), cfg.total_steps(), cfg.warmup_steps(), cfg.schedule.min_lr)
    if checkpoint is None:
        return RunStart(None, None, new_schedule)
    state = read_state(checkpoint)
    saved = state.get("config")
    if isinstance(saved, dict):
        difference = first_difference(saved, cfg)
        if difference:
            run_config = checkpoint.parent.parent / "config.yaml"  # RUN/checkpoints/last -> RUN/config.yaml
            settings = f" (--config {run_config})" if run_config.is_file() else ""
            raise ConfigError(f"--resume {checkpoint}: {difference}; resume with the checkpoint's settings{settings} "
                              "or train a new run (another --output)")
    check_same_data(cfg, checkpoint)
    schedule, note = resumed_schedule(cfg, state, checkpoint, new_schedule)
    return RunStart(checkpoint, state, schedule, note)


def check_same_data(cfg: TrainConfig, checkpoint: Path) -> None:
    """Refuse (``ConfigError`` naming the field) an offline resume whose saved source state is of
    another data set or seed than ``cfg`` gives; a state of another layout is left to the source."""
    if cfg.data.source != "offline":
        return
    try:
        saved = load_source_state(checkpoint, 0)
    except ValueError as exc:
        raise ConfigError(f"--resume: {exc}") from None
    first = (saved.get("ranks") or [None])[0] if isinstance(saved, dict) else None
    if not isinstance(first, dict) or not first.get("layout_independent"):
        return
    from trainer.data.sources.offline_index import data_identity  # the offline modules load only for offline runs

    def refuse(field_name: str, new: Any) -> None:
        raise ConfigError(f"--resume {checkpoint}: its data state has {field_name} = {first.get(field_name)!r}, "
                          f"this run's data {new!r} (another data set or --seed); resume with the checkpoint's "
                          "data and seed or train a new run (another --output)")

    if first.get("seed") != cfg.run.seed:
        refuse("seed", cfg.run.seed)
    try:
        current = data_identity(list(cfg.data.data), seed_dirs=list(cfg.data.folders) or None,
                                index_cache=cfg.data.index_cache)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config field data.data = {cfg.data.data!r}: cannot count its caption groups to check "
                          f"the resume: {exc}") from None
    for field_name in ("num_samples", "data_fingerprint"):
        if first.get(field_name) != current[field_name]:
            refuse(field_name, current[field_name])


def read_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--resume: {path} is not a readable checkpoint state ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ConfigError(f"--resume: {path} holds no step number; not a checkpoint of stablerep-train")
    return state


_MISSING = object()


def _show(value: Any) -> str:
    return "(unset)" if value is _MISSING else repr(value) if isinstance(value, str) else str(value)


def _diff(path: str, old: Any, new: Any) -> str | None:
    """``path = old`` vs ``new`` -> the first differing leaf as a sentence (maps compared key by key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            found = _diff(f"{path}.{key}", old.get(key, _MISSING), new.get(key, _MISSING))
            if found:
                return found
        return None
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        old, new = list(old), list(new)
    if old == new:
        return None
    return f"checkpoint has {path} = {_show(old)}, this config {_show(new)}"


def first_difference(saved: dict[str, Any], cfg: TrainConfig) -> str | None:
    """The first field of :data:`COMPARED_FIELDS` (then peak lr, warmup, min lr) in which the saved
    config and ``cfg`` differ, as ``checkpoint has FIELD = OLD, this config NEW``; ``None`` if none.
    A field the saved config lacks (written before the field existed) is not compared."""
    current = cfg.to_dict()
    for name in COMPARED_FIELDS:
        group, key = name.split(".")
        old = saved.get(group, {}).get(key, _MISSING) if isinstance(saved.get(group), dict) else _MISSING
        if old is _MISSING:
            continue
        found = _diff(name, old, current[group][key])
        if found:
            return found
    old_cfg = _saved_config(saved)
    for label, old, new in (("peak lr", old_cfg.peak_lr(), cfg.peak_lr()),
                            ("warmup steps", old_cfg.warmup_steps(), cfg.warmup_steps()),
                            ("schedule.min_lr", old_cfg.schedule.min_lr, cfg.schedule.min_lr)):
        if old != new and not _close(old, new):
            return f"checkpoint has {label} = {old:g}, this config {new:g}"
    return None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1.0)


def _saved_config(saved: dict[str, Any]) -> TrainConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated field names of older runs load under their new names
        try:
            return apply_overrides(TrainConfig(), saved, origin="the checkpoint's saved config")
        except ConfigError as exc:
            raise ConfigError(f"--resume: {exc}") from None


def resumed_schedule(cfg: TrainConfig, state: dict[str, Any], checkpoint: Path,
                     new: LrSchedule) -> tuple[LrSchedule, str | None]:
    """The lr schedule after resuming at ``state["step"]`` (see the module docstring)."""
    step = int(state["step"])
    if isinstance(state.get("lr_schedule"), dict):
        try:
            saved = LrSchedule.from_dict(state["lr_schedule"])
            saved(step), int(saved.total_steps)  # noqa: B018 - a schedule that cannot compute is refused here
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--resume {checkpoint}: {STATE_FILE} holds no usable lr_schedule ({exc})") from None
    else:  # a checkpoint written before schedules were saved: its config's plain schedule
        old_cfg = _saved_config(state.get("config") or {})
        saved = LrSchedule(new.peak_lr, int(state.get("total_steps", new.total_steps)), old_cfg.warmup_steps(),
                           new.min_lr)
    if saved.total_steps == new.total_steps:
        return saved, None
    if new.total_steps < step:
        raise ConfigError(f"--resume {checkpoint}: the checkpoint is at step {step}, past the new run length "
                          f"--steps {new.total_steps}")
    change = f"run length {saved.total_steps} -> {new.total_steps} steps"
    if cfg.schedule.resume_lr == "replan":
        return new, (f"{change} (--resume-lr replan): lr follows a {new.total_steps}-step schedule, "
                     f"{new(step):.3g} at step {step + 1} (the checkpoint's schedule: {saved(step):.3g})")
    if step < new.warmup_steps:
        return new, f"{change}: still in warmup; the cosine now ends at step {new.total_steps}"
    reached = saved(step)
    if step < new.total_steps and reached <= new.min_lr * (1 + 1e-9):
        raise ConfigError(
            f"--resume {checkpoint}: its {saved.total_steps}-step schedule has ended (lr {reached:g} = min lr), so "
            f"steps {step + 1}-{new.total_steps} would train at lr {reached:g}; give --resume-lr replan for the lr "
            f"of a {new.total_steps}-step schedule ({new(step):.3g} at step {step + 1}), or train a new run")
    return replace(new, from_step=step, from_lr=reached), (
        f"{change}: lr goes on from {reached:.3g} with a new cosine down to {new.min_lr:g} at step {new.total_steps} "
        "(--resume-lr continue)")


def load_error_line(exc: BaseException, limit: int = 300) -> str:
    """One line from a ``load_state_dict`` error (its first specific mismatch), for a checkpoint whose
    weights do not fit the model although the saved configs agreed."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = next((line for line in lines[1:] if line.startswith(("size mismatch", "Missing", "Unexpected"))), None)
    text = detail or (lines[0] if lines else type(exc).__name__)
    if len(text) > limit:
        text = text[:limit] + " ..."
    return f"the checkpoint's weights do not fit this model ({text})"
