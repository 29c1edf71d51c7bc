"""What a run reports: tracker logs, the progress bar, the live metrics endpoint, the curve, the summary.

:class:`TrainLog` starts the trackers (``run.log_with``), the tqdm bar and the Prometheus endpoint
(``run.metrics_port``, main process only); ``log`` writes one log step's numbers to all of them.
:func:`run_summary` is the dict ``trainer.loop.train`` returns.
"""
from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from trainer.status import stall_ratio
from trainer.train_build import TrainRun
from trainer.train_step import LoopState


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> flat {"group.field": scalar} (trackers take scalars only)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not prefix:
            out.update(_flat(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def _numbers(prefix: str, stats: dict) -> dict[str, float]:
    """Numeric entries (numbers, 0-d tensors) as floats; everything else is left out."""
    out = {}
    for key, value in stats.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[f"{prefix}{key}"] = float(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


class TrainLog:
    """Trackers, progress bar and live metrics of one run (built after the source, closed by ``close``)."""

    def __init__(self, run: TrainRun, stall_seconds: float | None = None) -> None:
        self.run = run
        self._last_stall = stall_seconds  # the source's stall counter at the previous log step
        if run.trackers:
            run.accelerator.init_trackers("stablerep", config=_flat(run.cfg.resolved_dict()))
        self.progress = tqdm(total=run.total_steps, initial=run.start_step, disable=not run.bar, dynamic_ncols=True,
                             desc="train")
        self.live = None  # Prometheus endpoint (trainer/live_metrics.py), main process only
        if run.cfg.run.metrics_port is not None and run.accelerator.is_main_process:
            from trainer.live_metrics import TrainerMetrics

            self.live = TrainerMetrics(run.cfg.run.metrics_port)
            run.accelerator.print(f"metrics at {self.live.url}")

    def is_log_step(self, step: int) -> bool:
        return step % self.run.cfg.run.log_every == 0 or step == self.run.total_steps

    def log(self, state: LoopState, loss_value: float, lr: float, grad_norm: torch.Tensor | None,
            metrics: dict[str, Any], batch_meta: dict, source: Any) -> None:
        """One log step: trackers, the live endpoint and the bar's postfix (loss, lr, img/s, replay numbers)."""
        run, step = self.run, state.step
        recent = state.step_seconds[-run.cfg.run.log_every:]
        images_per_s = run.images_per_step * len(recent) / max(sum(recent), 1e-9)
        source_stats = source.stats()
        logs = {"train/loss": loss_value, "train/lr": lr, "train/images_per_s": images_per_s,
                "train/images_seen": state.images_seen}
        if grad_norm is not None:
            logs["train/grad_norm"] = float(grad_norm)
        stall = source_stats.get("stall_seconds")
        if stall is not None and self._last_stall is not None:  # the trainer's stall ratio over the interval
            logs["train/stall_ratio"] = stall_ratio(float(stall) - self._last_stall, sum(recent))
        self._last_stall = float(stall) if stall is not None else None
        logs.update(_numbers("train/", {k: v for k, v in metrics.items() if k != "loss"}))
        logs.update(_numbers("batch/", batch_meta))
        logs.update(_numbers("source/", source_stats))
        run.accelerator.log(logs, step=step)
        if self.live is not None:
            self.live.update(step, logs, source_stats)
        postfix = {"loss": f"{loss_value:.4f}", "lr": f"{lr:.2e}", "img/s": f"{images_per_s:.1f}"}
        for key in ("reuse_mean", "fresh_fraction_last", "stall_seconds"):
            if key in source_stats:
                postfix[key.split("_")[0]] = f"{float(source_stats[key]):.2f}"
        self.progress.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self.progress.close()
        if self.live is not None:
            self.live.close()


def plot_curve(run: TrainRun, state: LoopState, losses: list[float], curve_kwargs: dict) -> None:
    """``OUTPUT/curve.png``: this run's losses and lr (main process, when it took a step)."""
    if not (run.main and losses):
        return
    from trainer.run_plots import plot_training_curve

    cfg = run.cfg
    plot_training_curve(run.output / "curve.png", losses, lrs=state.lrs, first_step=run.start_step + 1,
                        title=f"{cfg.method.name} {cfg.model.name}: steps {run.start_step + 1}-{state.step}",
                        **curve_kwargs)


def run_summary(run: TrainRun, state: LoopState, losses: list[float], source_stats: dict,
                monitor_summary: Any) -> dict[str, Any]:
    """What ``train`` returns (and the CLI writes to ``OUTPUT/train_summary.json``)."""
    timed = state.step_seconds[1:] or state.step_seconds  # the first step includes warm-up (compile, allocation)
    return {
        "steps": state.step,
        "start_step": run.start_step,
        "total_steps": run.total_steps,
        "images_seen": state.images_seen,
        "images_per_step": run.images_per_step,
        "losses": losses,
        "images_per_s": run.images_per_step * len(timed) / sum(timed) if timed else 0.0,
        "source_stats": source_stats,
        "checkpoint": str(state.last_checkpoint) if state.last_checkpoint else None,
        "output": str(run.output),
        "stopped": state.stopped,
        "interrupted": state.stopped.startswith("interrupted"),
        "lrs": state.lrs,
        "world_size": run.world_size,
        "device": str(run.device),
        "monitor": monitor_summary,
    }
