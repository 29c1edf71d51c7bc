"""The study over seeds: mean and standard deviation per arm of every probe, and the closed loop's
diversity read (``study.json``'s ``summary`` and ``closed_loop``).

Standard deviations are over seeds with ``ddof = 1`` (None for one seed).
"""
from __future__ import annotations

import statistics
from typing import Any, Callable, Iterable

from experiments.study_diversity import expected_gini_of_random_draws, ignored_classes


def _mean_std(values: Iterable[float | None]) -> dict[str, Any] | None:
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return None
    return {"mean": statistics.fmean(kept), "std": statistics.stdev(kept) if len(kept) > 1 else None, "n": len(kept)}


def _rows_by_name(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row.get("name", "random init"), []).append(row)
    return out


def _class_mean(per_class: dict[str, float] | None) -> float | None:
    """k-NN top-1 over a whole probe folder from its per-class accuracies (the probe sets are balanced)."""
    return statistics.fmean(per_class.values()) if per_class else None


def summarize(study: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """arm name (and "random init") -> {"seeds", "probe": {attribute: mean/std}, "knn" (the monitor's last
    reading, on its subset of each probe folder), "knn_full" (every image of the folder), "fewshot",
    "gini_drawn", "gini_generated", "groups_received", "groups_generated"}, each a ``{mean, std, n}``, and
    "curve" (:func:`summarize_curve`, None for an arm without one)."""
    attributes = study["plan"]["attributes"]

    def field(rows: list[dict[str, Any]], get: Callable[[dict[str, Any]], Any]) -> dict[str, Any] | None:
        return _mean_std(get(r) for r in rows)

    out: dict[str, dict[str, Any]] = {}
    rows_by_name = {"random init": study["random_init"], **_rows_by_name(study["arms"])}
    for name, rows in rows_by_name.items():
        out[name] = {
            "seeds": sorted(r["seed"] for r in rows),
            "probe": {a: field(rows, lambda r, a=a: r["probe"].get(a)) for a in attributes},
            "knn": {a: field(rows, lambda r, a=a: (r.get("knn") or {}).get(a)) for a in attributes},
            "knn_full": {a: field(rows, lambda r, a=a: _class_mean((r.get("knn_per_class") or {}).get(a)))
                         for a in attributes},
            "fewshot": field(rows, lambda r: (r.get("fewshot") or {}).get("accuracy")),
            "gini_drawn": field(rows, lambda r: (r.get("drawn") or {}).get("gini")),
            "gini_generated": field(rows, lambda r: (r.get("generated") or {}).get("gini")),
            "groups_received": field(rows, lambda r: r.get("groups_received")),
            "groups_generated": field(rows, lambda r: r.get("groups_generated")),
            "curve": summarize_curve(rows, attributes),
        }
    return out


def summarize_curve(rows: list[dict[str, Any]], attributes: list[str]) -> list[dict[str, Any]] | None:
    """One arm's k-NN curves over its seeds (``rows``: its rows of ``study.json``, each with ``curve``:
    experiments/study_curve.py), point by point (every seed evaluates at the same steps):
    ``[{step, groups_received: {mean, std, n}, knn: {attribute: {mean, std, n}}}]``; None without curves."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        for point in row.get("curve") or []:
            by_step.setdefault(point["step"], []).append(point)
    if not by_step:
        return None
    return [{"step": step, "groups_received": _mean_std(p.get("groups_received") for p in points),
             "knn": {a: _mean_std(p["knn"].get(a) for p in points) for a in attributes}}
            for step, points in sorted(by_step.items())]


def closed_loop_read(study: dict[str, Any], steered: str = "online-hard") -> dict[str, Any] | None:
    """Per seed, the probe classes the ``steered`` arm's generator fed least (``ignored_classes`` of its
    generated groups' attribute shares), and every arm's k-NN accuracy on those classes (mean over
    them) with its own share of them; then mean/std over seeds per arm and attribute. None without a
    steered arm that recorded its shares. ``random_draw_gini``: the Gini of as many groups drawn
    uniformly at random with replacement (the hard policy draws with replacement: its Gini with no
    preference at all), beside the steered arm's ``generated_gini``."""
    per_seed: list[dict[str, Any]] = []
    arms = study["arms"]
    for hard in (a for a in arms if a["name"] == steered and a.get("generated_shares")):
        ignored = ignored_classes(hard["generated_shares"])
        seed_rows = {}
        for arm in (a for a in arms if a["seed"] == hard["seed"] and a.get("knn_per_class")):
            shares = arm.get("generated_shares") or arm.get("drawn_shares") or {}
            seed_rows[arm["name"]] = {
                attribute: {
                    "knn_top1": statistics.fmean(arm["knn_per_class"][attribute][c] for c in classes),
                    "share": sum(shares.get(attribute, {}).get(c, 0.0) for c in classes),
                }
                for attribute, classes in ignored.items() if attribute in arm["knn_per_class"]
            }
        made = hard.get("generated") or {}
        random_gini = (expected_gini_of_random_draws(made["groups"], made["captions"], seed=hard["seed"])
                       if made.get("groups") else None)
        per_seed.append({"seed": hard["seed"], "ignored": ignored, "arms": seed_rows,
                         "generated_gini": made.get("gini"), "random_draw_gini": random_gini})
    if not per_seed:
        return None
    names = list(dict.fromkeys(n for s in per_seed for n in s["arms"]))
    attributes = list(per_seed[0]["ignored"])
    mean = {name: {a: {"knn_top1": _mean_std(s["arms"].get(name, {}).get(a, {}).get("knn_top1") for s in per_seed),
                       "share": _mean_std(s["arms"].get(name, {}).get(a, {}).get("share") for s in per_seed)}
                   for a in attributes} for name in names}
    return {"rule": "per attribute, the ceil(|values|/4) values with the smallest share of the groups the "
                    f"{steered} generator handed out, per seed", "per_seed": per_seed, "mean": mean}


def format_summary(study: dict[str, Any]) -> str:
    """The summary as a table: mean +- std over seeds per probe (linear; k-NN in brackets: on the whole
    probe folder where measured, else the monitor's)."""
    attributes = study["plan"]["attributes"]
    lines = [f"{'arm (mean +- std over seeds)':<28}" + "".join(f"{a:>22}" for a in attributes)
             + f"{'gini drawn':>12}{'groups':>9}"]
    for name, row in study["summary"].items():
        cells = []
        for a in attributes:
            lin, knn = row["probe"][a], row["knn_full"][a] or row["knn"][a]
            text = "-" if lin is None else f"{lin['mean']:.1f}{_std(lin)}"
            text += "" if knn is None else f" [{knn['mean']:.1f}]"
            cells.append(f"{text:>22}")
        gini = row["gini_drawn"]
        groups = row["groups_received"]
        lines.append(f"{name:<28}" + "".join(cells) + f"{'-' if gini is None else format(gini['mean'], '.3f'):>12}"
                     + f"{'-' if groups is None else format(groups['mean'], '.0f'):>9}")
    return "\n".join(lines)


def _std(cell: dict[str, Any]) -> str:
    return "" if cell["std"] is None else f" +- {cell['std']:.1f}"
