"""Plots of a run for humans: ``curve.png`` with the training loss (and, given them, probe accuracy)
over steps."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

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
