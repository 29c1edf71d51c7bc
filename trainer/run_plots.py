"""Plots of a run for humans: ``curve.png`` with the training loss and probe accuracy over steps; the
demo's ``report.json``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first)
import numpy as np  # noqa: E402


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over ``window`` values (shorter at the start); same length as ``values``."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0 or window <= 1:
        return x
    csum = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - window)
    return (csum[idx] - csum[lo]) / (idx - lo)


def plot_training_curve(
    path: str | Path,
    losses: Sequence[float],
    probe_curves: dict[str, tuple[Sequence[int], Sequence[float]]] | None = None,
    chance_accuracy: dict[str, float] | None = None,
    title: str = "",
    lrs: Sequence[float] | None = None,
    first_step: int = 1,
    initial_accuracy: dict[str, float] | None = None,
    accuracy_title: str = "linear probe on held-out images",
    legend_title: str = "probed attribute",
) -> Path:
    """Write a two-panel PNG: loss per step (raw + moving average) and probe accuracy (%) per step.

    ``probe_curves[name] = (steps, top1)``: probe accuracy of the backbone snapshot taken after
    ``steps[i]`` optimizer steps (step 0 = the random init); the first entry is drawn boldest.
    ``chance_accuracy[name]`` adds a dotted chance line of the same colour, ``initial_accuracy[name]``
    a dashed line at the random-init value. ``accuracy_title`` names the measure, ``legend_title`` the
    curves. ``lrs``: the learning
    rate per step, drawn dashed on a second axis of the loss panel; ``first_step``: the step number of
    ``losses[0]`` (a resumed run starts after its checkpoint). Without probe curves the figure
    has the loss panel only.
    """
    path = Path(path)
    if probe_curves:
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.4), dpi=110)
    else:  # a plain training run: the loss panel only
        fig, ax_loss = plt.subplots(1, 1, figsize=(7, 4.4), dpi=110)
        ax_acc = None
    steps = np.arange(first_step, first_step + len(losses))
    if len(losses):
        ax_loss.plot(steps, losses, color="#9bb7d4", linewidth=0.8, label="loss per step")
        window = max(1, len(losses) // 20)
        ax_loss.plot(steps, moving_average(losses, window), color="#1f4e79", linewidth=2,
                     label=f"moving average ({window} steps)")
        ax_loss.legend(loc="upper right", fontsize=8)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("multi-positive contrastive loss")
    ax_loss.set_title("training loss")
    ax_loss.grid(alpha=0.3)
    if lrs is not None and len(lrs):
        ax_lr = ax_loss.twinx()
        ax_lr.plot(np.arange(first_step, first_step + len(lrs)), lrs, color="#c0504d", linewidth=1, linestyle="--", label="lr")
        ax_lr.set_ylabel("learning rate (dashed)", color="#c0504d")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if ax_acc is None:
        return _save_figure(fig, path, title)

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, (xs, ys)) in enumerate(probe_curves.items()):
        colour = colours[(i + 3) % len(colours)]
        ax_acc.plot(xs, ys, marker="o", color=colour, linewidth=2.5 if i == 0 else 1.2, label=f"{name}")
        if i == 0:
            for x, y in zip(xs, ys):
                ax_acc.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
        if chance_accuracy and name in chance_accuracy:
            ax_acc.axhline(chance_accuracy[name], color=colour, linestyle=":", linewidth=1)
        if initial_accuracy and name in initial_accuracy:
            ax_acc.axhline(initial_accuracy[name], color=colour, linestyle="--", linewidth=0.8, alpha=0.7)
    ax_acc.set_xlabel("optimizer step (0 = random init)")
    ax_acc.set_ylabel("held-out top-1 accuracy (%)")
    ax_acc.set_ylim(0, 105)
    ax_acc.set_title(f"{accuracy_title} (dotted: chance" + (", dashed: random init)" if initial_accuracy else ")"),
                     fontsize=9)
    ax_acc.grid(alpha=0.3)
    if probe_curves:
        ax_acc.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title=legend_title)
    return _save_figure(fig, path, title)


def _save_figure(fig, path: Path, title: str | None) -> Path:
    """Title, lay out and write ``fig`` to ``path`` (parents created), then release it."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


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
