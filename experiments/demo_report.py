"""The demo's report: ``OUTPUT/report.json`` (headline probe, per-attribute probes, the k-NN curve of
the trainer's monitor, timings, what stopped the run) and ``OUTPUT/curve.png`` (trainer/run_plots.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from trainer.run_plots import plot_training_curve


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def demo_knn_curves(output: Path, attributes: list[str], monitor: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``knn`` section of a demo report from the run's ``OUTPUT/monitor.jsonl`` (trainer/monitor.py;
    the probe folder ``probe_<attribute>`` is the attribute's): ``{"file", "every", "k", "temperature",
    "per_attribute": {attribute: {"steps", "top1", "num_classes", "chance"}}, "failures"}``; None without
    the file (stopped before the monitor's first evaluation)."""
    from trainer.monitor import MONITOR_FILE

    path = output / MONITOR_FILE
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a stop
    per_attribute = {}
    for attribute in attributes:
        scored = sorted((r for r in rows if r.get("probe") == f"probe_{attribute}" and "knn_top1" in r),
                        key=lambda r: r["step"])
        if scored:
            per_attribute[attribute] = {"steps": [r["step"] for r in scored], "top1": [r["knn_top1"] for r in scored],
                                        "num_classes": scored[-1]["num_classes"],
                                        "chance": 100.0 / scored[-1]["num_classes"]}
    monitor = monitor or {}
    return {"file": str(path), "every": monitor.get("every"), "k": monitor.get("knn_k"),
            "temperature": monitor.get("knn_temperature"), "per_attribute": per_attribute,
            "failures": sum("error" in r for r in rows)}


def write_demo_report(
    output: str | Path,
    *,
    plan: dict[str, Any],
    summary: dict[str, Any],
    probes: list[dict[str, Any]],
    timings: dict[str, float],
    stopped_at: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write ``OUTPUT/report.json`` and ``OUTPUT/curve.png`` of a demo run; returns the report.

    ``probes``: linear-probe rows ``{"step", "attribute", "top1", "num_classes", ...}``; step 0 is the
    random init, the largest step the trained backbone. The first attribute of ``plan["attributes"]`` is
    the headline. The accuracy-vs-step curve is the monitor's k-NN (``knn``, :func:`demo_knn_curves`).
    ``stopped_at`` (``{"phase", "detail", "signal" or "error"}``): the run did not finish; the report
    is partial (``"interrupted": true``): ``summary`` may be empty (stopped before training ended) and
    attributes without a probe row are left out of ``per_attribute`` (their headline fields are None).
    """
    output = Path(output)
    attributes = list(plan["attributes"])
    headline = attributes[0]
    by_attr: dict[str, list[dict[str, Any]]] = {a: sorted((r for r in probes if r["attribute"] == a),
                                                          key=lambda r: r["step"]) for a in attributes}
    per_attribute = {}
    for attribute, rows in by_attr.items():
        if not rows:
            if stopped_at is None:
                raise ValueError(f"no probe result for attribute {attribute!r}")
            continue
        per_attribute[attribute] = {
            "trained": rows[-1]["top1"], "random_init": rows[0]["top1"], "num_classes": rows[-1]["num_classes"],
            "chance": 100.0 / rows[-1]["num_classes"], "steps": [r["step"] for r in rows],
            "top1": [r["top1"] for r in rows],
        }
    head = per_attribute.get(headline, {})
    knn = demo_knn_curves(output, attributes, summary.get("monitor"))
    losses = [float(v) for v in summary.get("losses", [])]
    k = max(1, min(10, len(losses) // 5 or 1))
    stats = summary.get("source_stats") or {}
    report = {
        "interrupted": stopped_at is not None,  # True: a partial report (see stopped_at)
        "stopped_at": stopped_at,
        "probe_attribute": headline,
        "probe_accuracy": head.get("trained"),
        "random_init_probe_accuracy": head.get("random_init"),
        "probe_margin": head["trained"] - head["random_init"] if head else None,
        "num_classes": head.get("num_classes"),
        "chance_accuracy": head.get("chance"),
        "per_attribute": per_attribute,
        "steps": int(summary.get("steps", 0)),
        "total_steps": int(summary.get("total_steps", plan.get("steps", 0))),
        "images_seen": int(summary.get("images_seen", 0)),
        "generated_groups": int(stats.get("groups_received", 0)),
        "train_images_per_s": float(summary.get("images_per_s", 0.0)),
        "loss_first": losses[0] if losses else None,  # the loss of the first optimizer step
        "loss_last": losses[-1] if losses else None,  # the loss of the last optimizer step
        "loss_window": k,  # steps averaged in loss_first_mean / loss_last_mean (noise of single steps)
        "loss_first_mean": _mean(losses[:k]),
        "loss_last_mean": _mean(losses[-k:]),
        "losses": losses,
        "probes": probes,
        "knn": knn,  # the k-NN curve of the run's monitor (OUTPUT/monitor.jsonl); None before its first evaluation
        "timings": timings,
        "source_stats": stats,
        "plan": plan,
        "backbone": str(output / "backbone.safetensors"),
        "config": str(output / "config.yaml"),
        "device": summary.get("device"),
        "curve": str(output / "curve.png"),
        **extra,
    }
    stop_note = f" (stopped in {stopped_at['phase']}: {stopped_at['detail']})" if stopped_at else ""
    curves = (knn or {}).get("per_attribute", {})
    labels = {a: f"{a} ({r['num_classes']} classes)" for a, r in curves.items()}
    plot_training_curve(
        output / "curve.png", losses,
        {labels[a]: (r["steps"], r["top1"]) for a, r in curves.items()},
        chance_accuracy={labels[a]: r["chance"] for a, r in curves.items()},
        initial_accuracy={labels[a]: r["top1"][0] for a, r in curves.items() if r["steps"][0] == 0},
        accuracy_title=f"k-NN (k={knn['k']}, T={knn['temperature']}) on held-out images" if knn else "k-NN",
        title=f"StableRep demo: {report['steps']} steps, {report['images_seen']} images, "
              f"{report['generated_groups']} generated groups{stop_note}",
        lrs=summary.get("lrs"),
    )
    output.mkdir(parents=True, exist_ok=True)
    tmp = output / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(output / "report.json")
    return report
