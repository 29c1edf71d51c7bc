"""Write a benchmark's results: JSON, a printed table, and a bar plot a person can look at."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from infra.machine_facts import machine_facts


#: the first line of every ``--quick`` table and plot: its numbers say nothing about speed
QUICK_NOTE = ("--quick: a tiny run that tests the code path, not the speed; its numbers are no measurement "
              "(run without --quick for those)")


def write_results(output: Path, name: str, results: dict[str, Any], table: str,
                  bars: dict[str, float] | None = None, unit: str = "",
                  spread: dict[str, tuple[float, float]] | None = None, note: str = "", xlabel: str = "",
                  quick: bool = False) -> Path:
    """Save ``name.json`` (results + machine facts), ``name.txt`` (the table) and ``name.png`` (bars).

    ``spread[bar] = (low, high)`` draws a range over the bar (e.g. min and max of the repeats);
    ``note`` is printed under the plot (e.g. what each bar is); ``xlabel`` names what the bars are.
    ``quick``: a ``--quick`` run; :data:`QUICK_NOTE` heads the table and the plot, and the JSON
    says ``"quick": true``.
    """
    output.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "quick": quick, "machine": machine_facts(), "results": results}
    path = output / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    (output / f"{name}.txt").write_text(table + "\n")
    if bars:
        _bar_plot(output / f"{name}.png", f"{name} (--quick: code path only, not speed)" if quick else name,
                  bars, unit, spread or {}, note, xlabel)
    return path


def spans_decades(values: list[float], ratio: float = 100.0) -> bool:
    """True when positive ``values`` differ by more than ``ratio`` (a log axis shows them all)."""
    positive = [v for v in values if v > 0]
    return len(positive) >= 2 and max(positive) / min(positive) > ratio


def bar_label(value: float, largest: float) -> str:
    """A bar's number: 3 significant digits; ``~0`` for one below a thousandth of the largest bar
    (e.g. a stall fraction of 1.2e-09 next to 0.4)."""
    if value != 0 and abs(value) < 1e-3 * abs(largest):
        return "~0"
    return f"{value:.3g}"


def _bar_plot(path: Path, title: str, bars: dict[str, float], unit: str,
              spread: dict[str, tuple[float, float]], note: str, xlabel: str = "") -> None:
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
    values = list(bars.values())
    log_scale = spans_decades(values) and min(values) > 0
    if log_scale:
        ax.set_yscale("log")
    ax.set_ylabel(f"{unit} (log scale)" if log_scale else unit)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    largest = max((abs(v) for v in values), default=0.0)
    for i, value in enumerate(values):
        ax.annotate(bar_label(value, largest), (i, value), ha="center", va="bottom", fontsize=8)
    if note:
        fig.text(0.01, 0.01, note, fontsize=6.5, va="bottom", ha="left", family="monospace")
        fig.tight_layout(rect=(0, 0.06 + 0.035 * note.count("\n"), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
