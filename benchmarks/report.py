"""Write a benchmark's results: JSON, a printed table, and a bar plot a person can look at."""
from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any


def machine_facts() -> dict[str, Any]:
    """Where a number was measured: host, CPU count, GPU (if any), commit, date."""
    import os

    import torch

    facts: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        facts["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        facts["commit"] = None
    return facts


def write_results(output: Path, name: str, results: dict[str, Any], table: str,
                  bars: dict[str, float] | None = None, unit: str = "",
                  spread: dict[str, tuple[float, float]] | None = None, note: str = "") -> Path:
    """Save ``name.json`` (results + machine facts), ``name.txt`` (the table) and ``name.png`` (bars).

    ``spread[bar] = (low, high)`` draws a range over the bar (e.g. min and max of the repeats);
    ``note`` is printed under the plot (e.g. what each bar is).
    """
    output.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_facts(), "results": results}
    path = output / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    (output / f"{name}.txt").write_text(table + "\n")
    if bars:
        _bar_plot(output / f"{name}.png", name, bars, unit, spread or {}, note)
    return path


def _bar_plot(path: Path, title: str, bars: dict[str, float], unit: str,
              spread: dict[str, tuple[float, float]], note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6 if note else 4, 0.9 * len(bars) + 2), 3.5 + 0.18 * note.count("\n")
                                    + (0.4 if note else 0)))
    ax.bar(list(bars), list(bars.values()), color="#4477aa")
    for i, key in enumerate(bars):
        if key in spread:
            low, high = spread[key]
            ax.vlines(i, low, high, color="black", linewidth=1.2)
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    for i, value in enumerate(bars.values()):
        ax.annotate(f"{value:.3g}", (i, value), ha="center", va="bottom", fontsize=8)
    if note:
        fig.text(0.01, 0.01, note, fontsize=6.5, va="bottom", ha="left", family="monospace")
        fig.tight_layout(rect=(0, 0.06 + 0.035 * note.count("\n"), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
