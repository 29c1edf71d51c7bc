"""The study's table and plot (``study.txt``, ``study.png``) from ``study.json``."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def format_table(study: dict[str, Any]) -> str:
    attributes = study["plan"]["attributes"]
    lines = ["arm                  seed  " + "  ".join(f"{a:>10}" for a in attributes) + "   few-shot  reuse"]
    for row in study["random_init"]:
        lines.append(f"{'random init':<20} {row['seed']:>4}  " + "  ".join(f"{row['probe'][a]:>10.1f}" for a in attributes)
                     + f"   {_fewshot(row):>8}")
    for arm in study["arms"]:
        reuse = "-" if arm["mean_reuse"] is None else f"{arm['mean_reuse']:.2f}"
        lines.append(f"{arm['name']:<20} {arm['seed']:>4}  " + "  ".join(f"{arm['probe'][a]:>10.1f}" for a in attributes)
                     + f"   {_fewshot(arm):>8}  {reuse:>5}")
    return "\n".join(lines)


def _fewshot(row: dict[str, Any]) -> str:
    return "-" if row["fewshot"] is None else f"{row['fewshot']['accuracy']:.1f}"


def plot(study: dict[str, Any], path: Path) -> Path:
    """Bars: each attribute's top-1 per arm (mean over seeds) against the random init; line:
    top-1 against max reuse for the stablerep online arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attributes = study["plan"]["attributes"]
    names = list(dict.fromkeys(a["name"] for a in study["arms"]))

    def mean(rows, attribute):
        values = [r["probe"][attribute] for r in rows]
        return sum(values) / len(values)

    fig, (bars, line) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / (len(names) + 1)
    for k, name in enumerate(["random init", *names]):
        rows = study["random_init"] if name == "random init" else [a for a in study["arms"] if a["name"] == name]
        bars.bar([i + k * width for i in range(len(attributes))], [mean(rows, a) for a in attributes], width,
                 label=name)
    bars.set_xticks([i + 0.4 for i in range(len(attributes))], attributes)
    bars.set_ylabel("held-out linear probe top-1 (%)")
    bars.legend(fontsize=7)
    reuse_arms = [a for a in study["arms"] if a["method"] == "stablerep" and a["source"] == "online"
                  and a.get("policy") is None]
    limits = sorted({a["max_reuse"] for a in reuse_arms if a["max_reuse"] is not None})
    xs = limits + [2 * max(limits, default=1) * 2]  # unlimited, drawn to the right
    for attribute in attributes:
        ys = [mean([a for a in reuse_arms if a["max_reuse"] == r], attribute) for r in limits]
        unlimited = [a for a in reuse_arms if a["max_reuse"] is None]
        if unlimited:
            ys.append(mean(unlimited, attribute))
        line.plot(xs[:len(ys)], ys, "o-", label=attribute)
    line.set_xscale("log", base=2)
    line.set_xticks(xs, [str(r) for r in limits] + ["unlimited"])
    line.set_xlabel("--max-reuse (stablerep, online)")
    line.set_ylabel("top-1 (%)")
    line.legend(fontsize=7)
    fig.suptitle(f"study: {study['plan']['steps']} steps per arm, generator {study['plan']['image_rate']:g} images/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
