"""Probes of backbone snapshots (experiments/snapshots.py): the fast linear probe of every snapshot
on every probe set, and 5-way 1-shot episodes at the first and the last snapshot.

The demo keeps its rows one by one so a stop loses none: every finished probe is appended to
``OUTPUT/probes.json`` at once, and a later run (``stablerep-bench demo --probes-only``) probes only
the (step, attribute) pairs still missing. The study scores each arm's final backbone the same way.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

PROBES_FILE = "probes.json"


def load_probe_rows(output: Path) -> list[dict[str, Any]]:
    """The probes an earlier run of this output finished (``[]`` when none)."""
    path = Path(output) / PROBES_FILE
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc}); delete it to probe again") from exc
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"step", "attribute", "top1"} <= set(r)
                                             for r in rows):
        raise ValueError(f"{path} is not a list of probe rows with step, attribute and top1; delete it to probe again")
    return rows


def save_probe_rows(output: Path, rows: list[dict[str, Any]]) -> None:
    tmp = Path(output) / f".{PROBES_FILE}.tmp"
    tmp.write_text(json.dumps(rows, indent=2))
    tmp.replace(Path(output) / PROBES_FILE)


def probe_snapshots(
    snapshots: dict[int, Path], probe_dirs: dict[str, Path], *, epochs: int, seed: int, log,
    done: list[dict[str, Any]] | None = None, on_row: Callable[[list[dict[str, Any]]], None] | None = None,
    progress=None,
) -> list[dict[str, Any]]:
    """Fast linear probe of every snapshot on every attribute's train/val folders.

    ``done``: rows finished before (kept, not probed again); ``on_row(rows)`` is called with all rows
    so far after each new probe (the demo saves them); ``progress`` (``trainer.interrupts.Progress``)
    learns which probe runs. ``epochs``, ``seed``: of every probe's classifier (``FastProbeConfig``).
    """
    from trainer.eval import FastProbeConfig, linear_probe, load_eval_backbone
    from trainer.eval.features import resolve_device

    device = resolve_device("auto")
    cfg = FastProbeConfig(epochs=epochs, seed=seed)
    finished = {(r["step"], r["attribute"]): r for r in (done or [])}
    rows = [r for r in (done or []) if r["step"] in snapshots and r["attribute"] in probe_dirs]
    todo = [(step, attribute) for step in sorted(snapshots) for attribute in probe_dirs
            if (step, attribute) not in finished]
    if finished and todo:
        log(f"keeping {len(rows)} finished probes; {len(todo)} to run")
    t0 = time.perf_counter()
    loaded: tuple[int, Any] | None = None
    for n, (step, attribute) in enumerate(todo):
        if loaded is None or loaded[0] != step:
            loaded = (step, load_eval_backbone(snapshots[step]))
        elapsed = time.perf_counter() - t0
        eta = f", about {elapsed / n * (len(todo) - n):.0f} s left" if n else ""
        where = f"probe {n + 1}/{len(todo)}: snapshot step {step}, attribute {attribute}"
        if progress is not None:
            progress.enter("probes", where)
        log(f"{where} ({elapsed:.0f} s into the probe phase{eta})")
        folder = probe_dirs[attribute]
        result = linear_probe(loaded[1], folder / "train", folder / "val", cfg, device, batch_size=256, workers=0)
        rows.append({"step": step, "attribute": attribute, "top1": result["top1"],
                     "train_top1": _selected_row(result)["train_top1"], "num_classes": result["num_classes"],
                     "selected": result["selected"], "val_images": result["val_images"],
                     "skipped_images": result["skipped_images"], "seconds": result["seconds"]})
        if on_row is not None:
            on_row(rows)
        log(f"probe step {step:5d} {attribute:>10}: top-1 {result['top1']:.1f}% "
            f"({result['num_classes']} classes, {result['val_images']} held-out images)")
    return sorted(rows, key=lambda r: (r["step"], list(probe_dirs).index(r["attribute"])))


def _selected_row(result: dict[str, Any]) -> dict[str, Any]:
    """The grid row of the classifier the probe selected (its train accuracy is the one reported)."""
    chosen = result["selected"]
    return next(row for row in result["grid"]
                if row["lr"] == chosen["lr"] and row["weight_decay"] == chosen["weight_decay"])


FEWSHOT_MIN_PER_CLASS = 11  # 1 shot + 10 queries


def fewshot_endpoints(snapshots: dict[int, Path], data_dir: Path, *, seed: int, log, progress=None) -> dict[str, Any]:
    """5-way 1-shot episodes (logistic regression on L2-normalized features) at init and at the end."""
    from trainer.eval import FewShotConfig, fewshot_probe, load_eval_backbone
    from trainer.eval.features import resolve_device

    cfg = FewShotConfig(n_way=5, k_shot=1, n_query=10, episodes=200, seed=seed)
    out: dict[str, Any] = {"config": asdict(cfg), "data": str(data_dir)}
    for name, step in (("random_init", min(snapshots)), ("trained", max(snapshots))):
        if progress is not None:
            progress.enter("few-shot", f"{name}, snapshot step {step}")
        result = fewshot_probe(load_eval_backbone(snapshots[step]), data_dir, cfg, resolve_device("auto"))
        out[name] = {"step": step, "accuracy": result["accuracy"], "ci95": result["ci95"]}
        log(f"few-shot {cfg.n_way}-way {cfg.k_shot}-shot ({data_dir.parent.name}), {name}: "
            f"{result['accuracy']:.1f}% +- {result['ci95']:.1f}")
    return out
