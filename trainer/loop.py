"""The training loop: one flat function, readable top to bottom.

``train(cfg)`` builds everything from a :class:`trainer.config.TrainConfig` (``trainer.train_build``), runs
``schedule.total_steps`` optimizer steps (continuing from a checkpoint with ``run.resume``) and
returns a summary dict. Each step:

    batch (uint8 [G, n, H, W, 3]) from the source -> device (non_blocking)
    -> method(model, batch, augment) -> (loss, metrics)   [under autocast]
    -> backward -> (check steps: non-finite check) -> optional grad clip -> AdamW step

The next batch is drawn in a background thread while a step runs (``step_pipeline.Prefetcher``).
Losses stay on the device and are read back only at check steps: log steps, checkpoint saves, the
last step and a stop (``step_pipeline.LossLedger``; what that means for a non-finite loss is
described there). A single process stops on SIGTERM/SIGINT after the current step; several
processes agree on a stop at the next check step.

Multi-process runs go through ``accelerate launch``: every process builds its own source and
draws ``captions_per_step / num_processes`` groups per step; the contrastive loss gathers features
across processes.

The pieces: ``trainer.train_build`` (checks, accelerator, model, optimizer, resume),
``trainer.train_step`` (check steps, the update, checkpoints) and ``trainer.train_log`` (trackers,
progress bar, live metrics, curve, summary).
"""
from __future__ import annotations

import signal
import time
from functools import partial
from typing import Any

import torch

from trainer.data.sources.generator_watch import GeneratorsSilentError
from trainer.config import TrainConfig
from trainer.interrupts import StopAfterStep
from trainer.monitor import Monitor
from trainer.preflight import estimate_memory
from trainer.step_pipeline import LossLedger, Prefetcher
from trainer.train_build import build_components, build_run, meta_model
from trainer.train_feedback import build_reporter, split_difficulty
from trainer.train_log import TrainLog, plot_curve, run_summary
from trainer.train_step import (
    LoopState,
    NonFiniteLossError,
    agree_at_check,
    is_check_step,
    optimizer_update,
    save_run_checkpoint,
    set_lr,
    stopped_for_silence,
)

__all__ = ["NonFiniteLossError", "build_components", "build_source", "meta_model", "train"]


def build_source(cfg: TrainConfig, *, device: torch.device, rank: int, world_size: int, local_captions: int):
    """The data source of this process: the source registered as ``data.source``, built from the
    ``data`` and ``replay`` config groups (``trainer.data.sources.source_from_config``)."""
    from trainer.data.sources import SourceContext, source_from_config

    def training_bytes() -> int:  # asked by a source that places memory beside training (the online buffer)
        return int(estimate_memory(cfg, meta_model(cfg), world_size).total_gib * 2**30)

    context = SourceContext(captions_per_rank=local_captions, rank=rank, world_size=world_size, seed=cfg.run.seed,
                            device=device, training_bytes=training_bytes)
    return source_from_config(cfg.data, cfg.replay, context)


def train(cfg: TrainConfig, *, source=None) -> dict[str, Any]:
    """Run training as configured; returns a summary (``trainer.train_log.run_summary``).

    ``source``: an already-built source to use instead of the one ``cfg.data`` describes (the
    caller keeps ownership and closes it).

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
        ConfigError: the batch does not split over the processes; paper-scale settings on a CPU; OUTPUT
            holds a run and neither ``run.resume`` nor ``run.overwrite`` is set; the checkpoint to resume is
            missing or does not fit this config (``trainer.resume_check``, checked before anything is written).
        LaunchError: the processes of a multi-process launch did not form one process group.
        ConnectionError: the online source reached no generator.
    """
    run = build_run(cfg)  # every check first; then accelerator, model, optimizer, resume, OUTPUT/config.yaml
    accelerator, model, status = run.accelerator, run.model, run.status
    monitor = Monitor(cfg, run.unwrapped, accelerator, run.output, status)  # k-NN on probe folders
    own_source = source is None
    if not own_source:
        monitor.watch(source)  # started already: step 0's rows count what it has received
    with StopAfterStep() as early:  # Ctrl-C during it stops after step 1, as one during the loop
        # step 0 (the random init), before the source starts: an online one would fill its buffer meanwhile
        monitor.start(run.start_step, run.images_seen)
    if own_source:
        source = build_source(cfg, device=run.device, rank=run.rank, world_size=run.world_size,
                              local_captions=run.local_captions)
        monitor.watch(source)
    source_state, saved_difficulty = split_difficulty(run.source_state, run.rank)
    if source_state is not None:
        source.load_state_dict(source_state)
    start_stall = source.stats().get("stall_seconds")  # the stall ratios count from here
    logs = TrainLog(run, start_stall)  # trackers, progress bar, live metrics
    ledger = LossLedger(run.start_step)  # losses on the device, read back at check steps
    state = LoopState(run.start_step, run.images_seen, run.last_checkpoint)
    silent_generators = getattr(source, "silent_generators", None)  # online sources only
    feedback = build_reporter(cfg, run.method, source, saved_difficulty)  # per-caption difficulty (online)
    monitor.attach_logs(logs.live)  # step 0's scalars to the trackers now
    prefetch = Prefetcher(source, run.device, limit=run.total_steps - run.start_step)
    checkpoint = partial(save_run_checkpoint, run, state, ledger, prefetch, source, feedback)  # (last_loss) -> Path
    status.start(run.start_step, start_stall)
    try:
        with StopAfterStep() as stop:
            stop.signal = early.signal
            while state.step < run.total_steps:
                t0 = time.perf_counter()
                lr = set_lr(run.optimizer, run.schedule(state.step))

                # Online: every generator silent for --generator-timeout -> checkpoint, GeneratorsSilentError.
                silent = silent_generators() if silent_generators is not None else None
                try:
                    batch = prefetch.next()  # drawn and copied while the previous step ran
                except GeneratorsSilentError as exc:  # the buffer ran dry as well
                    raise stopped_for_silence(str(exc), state.step, checkpoint(None)) from None
                with accelerator.autocast():
                    loss, metrics = run.method(model, batch, run.augment)
                accelerator.backward(loss)
                ledger.add(loss)
                caption_loss = metrics.pop("caption_loss", None)  # [G] on the device; not a logged scalar
                if feedback is not None:
                    feedback.after_step(state.step + 1, batch.caption_ids, caption_loss)

                # Check steps read the losses back (a host-device sync); other steps do not wait.
                stop_now, generators_silent = stop.signal is not None, silent is not None
                check = is_check_step(run, state.step + 1, stop_now, generators_silent)
                if check:  # raises NonFiniteLossError before this step's update
                    stop_now, generators_silent = agree_at_check(run, ledger, state.step + 1, stop_now,
                                                                 generators_silent, state.last_checkpoint)
                else:
                    stop_now = generators_silent = False  # several processes: acted on at the next check step
                loss_value = ledger.values[-1] if check else loss.detach()  # a float at check steps, else a device scalar

                grad_norm = optimizer_update(run)  # clip, AdamW, zero grads, logit-scale clamp
                state.advance(lr, time.perf_counter() - t0, run.images_per_step)
                if run.main:
                    status.step(state.step, run.total_steps, loss_value, lr, run.images_per_step, source.stats,
                                force=state.step == run.total_steps or stop_now)
                monitor.after_step(state.step, state.images_seen)
                if logs.is_log_step(state.step):
                    logs.log(state, loss_value, lr, grad_norm, metrics, batch.meta, source)
                logs.progress.update(1)

                if state.step % cfg.run.save_every == 0 and state.step < run.total_steps:
                    state.last_checkpoint = checkpoint(loss_value)
                if generators_silent:
                    why = silent or "every generator silent on another rank"
                    raise stopped_for_silence(why, state.step, checkpoint(loss_value))
                if stop_now:
                    name = signal.Signals(stop.signal).name if stop.signal is not None else "signal on another rank"
                    state.stopped = f"interrupted ({name})"
                    break
        monitor.finish(state.step, state.images_seen, completed=state.stopped == "completed")
        if state.step > run.start_step or state.last_checkpoint is None:
            state.last_checkpoint = checkpoint(None)
        source_stats = source.stats()
        status.note(f"{state.stopped} at step {state.step}/{run.total_steps}; checkpoint {state.last_checkpoint}",
                    echo=run.main)
        plot_curve(run, state, ledger.values, monitor.curve_kwargs())
    finally:
        prefetch.close()
        logs.close()
        status.close()
        if own_source:
            source.close()
        accelerator.end_training()
    return run_summary(run, state, ledger.values, source_stats, monitor.summary())
