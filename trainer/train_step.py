"""The pieces of one training step that ``trainer.loop.train`` calls: check steps, the update, checkpoints.

Check steps (log steps, checkpoint saves, the last step, a stop) read the losses back from the device
(``step_pipeline.LossLedger``) and, with several processes, agree on non-finite losses and stops in one
all-reduce (:func:`agree_at_check`). Every checkpoint checks the pending losses first, so no weights
that a non-finite step touched are ever saved (:func:`save_run_checkpoint`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import save_checkpoint
from trainer.data.sources.generator_watch import GeneratorsSilentError
from trainer.step_pipeline import LossLedger, Prefetcher
from trainer.train_build import TrainRun
from trainer.train_feedback import with_difficulty


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before that step's update."""

    def __init__(self, step: int, loss: float, checkpoint: Path | None) -> None:
        self.step, self.loss, self.checkpoint = step, loss, checkpoint
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"non-finite loss ({loss}) at step {step}: training stopped before applying that step's update; {kept}. "
            "Lower the learning rate (--lr / --base-lr), add --grad-clip, or use --precision bf16 instead of fp16."
        )


@dataclass
class LoopState:
    """What changes from step to step: the counters, the last checkpoint, how the run ended."""

    step: int  # optimizer steps done
    images_seen: int
    last_checkpoint: Path | None
    stopped: str = "completed"  # or "interrupted (SIGINT)", ...
    lrs: list[float] = field(default_factory=list)  # lr of every step of this process's run
    step_seconds: list[float] = field(default_factory=list)  # wall time of every step

    def advance(self, lr: float, seconds: float, images_per_step: int) -> None:
        """One optimizer step done."""
        self.step += 1
        self.images_seen += images_per_step
        self.lrs.append(lr)
        self.step_seconds.append(seconds)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def is_check_step(run: TrainRun, done: int, stop_now: bool, generators_silent: bool) -> bool:
    """Whether step ``done`` (1-based) reads the losses back: log and save steps, the last step, and a
    stop or silent generators when there is one process (several agree at their next check step)."""
    every = run.cfg.run
    return (done % every.log_every == 0 or done == run.total_steps or done % every.save_every == 0
            or (run.world_size == 1 and (stop_now or generators_silent)))


def raise_if_non_finite(ledger: LossLedger, last_checkpoint: Path | None,
                        bad: tuple[int, float] | None = None) -> None:
    """Raise NonFiniteLossError at ``bad`` (step, loss), or at the first non-finite pending loss."""
    bad = ledger.flush() if bad is None else bad
    if bad is not None:
        raise NonFiniteLossError(bad[0], bad[1], last_checkpoint)


def agree_at_check(run: TrainRun, ledger: LossLedger, done: int, stop_now: bool, generators_silent: bool,
                   last_checkpoint: Path | None) -> tuple[bool, bool]:
    """At a check step: raise NonFiniteLossError for a non-finite loss on any process (before this step's
    update); returns (stop_now, generators_silent) as all processes agree on them."""
    bad = ledger.flush()
    if run.world_size > 1:  # all processes must agree, or the others would hang in the next all-reduce
        flags = torch.tensor([float(bad is not None), float(stop_now), float(generators_silent)], device=run.device)
        flags = run.accelerator.reduce(flags, reduction="sum")
        non_finite, stop_now, generators_silent = (bool(f > 0) for f in flags.tolist())
        if non_finite and bad is None:
            bad = (done, math.nan)  # another process's loss
    raise_if_non_finite(ledger, last_checkpoint, bad)
    return stop_now, generators_silent


def optimizer_update(run: TrainRun) -> torch.Tensor | None:
    """Optional grad clip, AdamW step, zero grads, logit-scale clamp; returns the grad norm when clipping."""
    grad_norm = None
    if run.cfg.optim.grad_clip is not None:
        grad_norm = run.accelerator.clip_grad_norm_(run.model.parameters(), run.cfg.optim.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.unwrapped.clamp_logit_scale_()  # official: logit scale in [0, ln 100] after every step
    return grad_norm


def save_run_checkpoint(run: TrainRun, state: LoopState, ledger: LossLedger, prefetch: Prefetcher, source: Any,
                        feedback: Any, last_loss: float | None) -> Path:
    """Check the pending losses, then save weights, optimizer, RNG and source state at ``state.step`` (with
    the per-caption averages of ``feedback``, a ``trainer.train_feedback.FeedbackReporter`` or None)."""
    raise_if_non_finite(ledger, state.last_checkpoint)  # never save weights that a non-finite step has touched
    cfg, step = run.cfg, state.step
    last_loss = ledger.last() if last_loss is None else last_loss
    source_state = prefetch.state_dict()  # not counting the batch drawn ahead
    trainer_state = {
        "images_seen": state.images_seen, "config": cfg.to_dict(), "loss": last_loss,
        "lr": run.schedule(max(step - 1, 0)), "lr_schedule": run.schedule.to_dict(),
        "total_steps": run.total_steps, "source_stats": source.stats(), "source_state": source_state,
        "rng": {"seed": cfg.run.seed, "states": [f"random_states_{r}.pkl" for r in range(run.world_size)]},
    }
    return save_checkpoint(
        run.accelerator, run.output, step=step, trainer_state=trainer_state,
        source_state=with_difficulty(source_state, feedback),
        model=run.unwrapped,
    )


def stopped_for_silence(why: str, step: int, checkpoint: Path) -> GeneratorsSilentError:
    """The error that ends a run whose generators went silent (after saving ``checkpoint``)."""
    return GeneratorsSilentError(f"{why}; stopped after step {step}, checkpoint {checkpoint} "
                                 "(--resume auto continues once generators serve again)")
