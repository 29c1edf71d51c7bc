"""The study's learning curve of the closed loop: k-NN top-1 against the groups the trainer received.

In a ``--closed-loop`` study the closed-loop arms and the offline arm run the trainer's k-NN
monitor every ``max(1, steps // 4)`` steps (:func:`curve_every`) instead of only at the end, so each
of them has 5 points (step 0, a quarter, half, three quarters and the last step). Each monitor row
carries ``groups_received``: the distinct caption groups the training source had had by then
(``trainer/monitor.py``), so the three arms, held to the same groups, are compared at equal data.

Per arm and seed, ``curve`` in ``study.json`` holds the points ``{step, groups_received, knn:
{attribute: top1}}`` (:func:`read_curve`); ``summary[arm]["curve"]`` their mean and std over seeds,
point by point (``experiments.study_summary.summarize_curve``); ``study.txt`` a table of it (:func:`format_curves`) and
``study-curve.png`` one panel per probe, one line per arm (:func:`plot_curves`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.monitor import MONITOR_FILE

#: the monitor's evaluations of a curve arm after step 0
CURVE_POINTS = 4
CURVE_PNG = "study-curve.png"


def curve_every(steps: int) -> int:
    """``--monitor-every`` of a curve arm: ``CURVE_POINTS`` evaluations after step 0 (more for fewer steps)."""
    return max(1, steps // CURVE_POINTS)


def read_curve(run_dir: Path, probe_dirs: dict[str, Path]) -> list[dict[str, Any]]:
    """The monitor's evaluations of one run (``run_dir/monitor.jsonl``), by step:
    ``[{step, groups_received, knn: {attribute: top1 or None}}]`` (``probe_dirs``: attribute -> probe
    folder, the monitor names a probe after its folder; a failed evaluation reads None)."""
    attribute_of = {Path(folder).name: attribute for attribute, folder in probe_dirs.items()}
    points: dict[int, dict[str, Any]] = {}
    path = run_dir / MONITOR_FILE
    if not path.exists():
        return []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        attribute = attribute_of.get(row.get("probe"))
        if attribute is None:
            continue
        point = points.setdefault(row["step"], {"step": row["step"], "groups_received": row.get("groups_received"),
                                                "knn": {a: None for a in probe_dirs}})
        point["knn"][attribute] = row.get("knn_top1")
    return [points[step] for step in sorted(points)]


def format_curves(study: dict[str, Any]) -> str:
    """The curves as a table: per arm and point, mean groups received and k-NN top-1 mean +- std over seeds."""
    attributes = study["plan"]["attributes"]
    curves = {name: row["curve"] for name, row in study["summary"].items() if row.get("curve")}
    if not curves:
        return ""
    lines = ["k-NN top-1 of the monitor against groups received (mean +- std over seeds)",
             f"{'arm':<20}{'step':>6}{'groups':>9}" + "".join(f"{a:>16}" for a in attributes)]
    for name, points in curves.items():
        for point in points:
            groups = point["groups_received"]
            cells = []
            for a in attributes:
                cell = point["knn"][a]
                text = "-" if cell is None else f"{cell['mean']:.1f}" + (
                    "" if cell["std"] is None else f" +- {cell['std']:.1f}")
                cells.append(f"{text:>16}")
            lines.append(f"{name:<20}{point['step']:>6}{'-' if groups is None else format(groups['mean'], '.0f'):>9}"
                         + "".join(cells))
    return "\n".join(lines)


def plot_curves(study: dict[str, Any], path: Path) -> Path | None:
    """``study-curve.png``: one panel per probe, k-NN top-1 (mean over seeds) against mean groups
    received, one line per arm with a curve; None (no file) when no arm has one."""
    curves = {name: row["curve"] for name, row in study["summary"].items() if row.get("curve")}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attributes = study["plan"]["attributes"]
    fig, axes = plt.subplots(1, len(attributes), figsize=(4.2 * len(attributes), 3.8), squeeze=False)
    for ax, attribute in zip(axes[0], attributes):
        for name, points in curves.items():
            kept = [p for p in points if p["groups_received"] is not None and p["knn"][attribute] is not None]
            ax.plot([p["groups_received"]["mean"] for p in kept], [p["knn"][attribute]["mean"] for p in kept],
                    "o-", label=name)
        ax.set_title(attribute)
        ax.set_xlabel("groups received (mean over seeds)")
        ax.set_ylabel("k-NN top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    seeds = max(len(row["seeds"]) for name, row in study["summary"].items() if name in curves)
    fig.suptitle(f"the k-NN monitor against the groups each arm received ({study['plan']['steps']} steps, "
                 f"{seeds} seed{'s' if seeds > 1 else ''})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
