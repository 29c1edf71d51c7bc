"""The training loop: one flat function, readable top to bottom.

``train(cfg)`` builds everything from a :class:`trainer.config.TrainConfig`, runs
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
"""
from __future__ import annotations

import inspect
import logging
import math
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from tqdm.auto import tqdm

from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.data.sources.generator_watch import GeneratorsSilentError
from trainer.config import ConfigError, TrainConfig, write_config
from trainer.preflight import check_cpu_scale, check_data_paths, estimate_memory
from trainer.launch import (
    accelerator_cpu_flag,
    backend_name,
    check_joined,
    check_single_launch,
    collective_timeout_s,
    fresh_accelerator_state,
    launch_env,
)
from trainer.interrupts import StopAfterStep
from trainer.monitor import Monitor
from trainer.resume_check import check_run_start, clear_run, load_error_line
from trainer.status import StatusLog
from trainer.step_pipeline import LossLedger, Prefetcher

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before that step's update."""

    def __init__(self, step: int, loss: float, checkpoint: Path | None) -> None:
        self.step, self.loss, self.checkpoint = step, loss, checkpoint
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"non-finite loss ({loss}) at step {step}: training stopped before applying that step's update; {kept}. "
            "Lower the learning rate (--lr / --base-lr), add --grad-clip, or use --precision bf16 instead of fp16."
        )


# ----- building blocks ---------------------------------------------------------------------------


def build_components(cfg: TrainConfig):
    """Model (unwrapped, on CPU), method and augmentation as the config names them."""
    from trainer.augment import GPUAugment
    from trainer.objectives.methods import METHODS, build_method
    from trainer.models.stablerep_model import build_model

    method_kwargs = dict(cfg.method.kwargs)
    if "temperature" in inspect.signature(METHODS.get(cfg.method.name)).parameters:  # clip has a learned scale
        method_kwargs.setdefault("temperature", cfg.method.temperature)
    method = build_method(cfg.method.name, **method_kwargs)
    m = cfg.model
    model = build_model(
        m.name, img_size=m.img_size, model_kwargs=m.model_kwargs, head_hidden=m.head_hidden, head_out=m.head_out,
        head_layers=m.head_layers if method.needs_head else 0,  # clip uses no SSL head: DDP needs every param used
        sync_bn=m.sync_bn, text=dict(m.text) if method.needs_text else None, head_per_view=m.head_per_view,
    )
    augment = GPUAugment(
        size=cfg.crop_size(), strong=cfg.augment.strong, scale=(cfg.crop_scale_min(), 1.0),
        downsample=cfg.augment.downsample, down_res=tuple(cfg.augment.down_res), down_prob=cfg.augment.down_prob,
        crops_per_image=cfg.augment.crops_per_image, blur_p=cfg.augment.blur_p,
    )
    return model, method, augment


def meta_model(cfg: TrainConfig) -> torch.nn.Module:
    """The configured model on the meta device: its shapes without allocating memory."""
    with torch.device("meta"):
        model, _, _ = build_components(cfg)
    return model


def build_source(cfg: TrainConfig, *, device: torch.device, rank: int, world_size: int, local_captions: int):
    """The data source of this process: the source registered as ``data.source``, built from the
    ``data`` and ``replay`` config groups (``trainer.data.sources.source_from_config``)."""
    from trainer.data.sources import SourceContext, source_from_config

    def training_bytes() -> int:  # asked by a source that places memory beside training (the online buffer)
        return int(estimate_memory(cfg, meta_model(cfg), world_size).total_gib * 2**30)

    context = SourceContext(captions_per_rank=local_captions, rank=rank, world_size=world_size, seed=cfg.run.seed,
                            device=device, training_bytes=training_bytes)
    return source_from_config(cfg.data, cfg.replay, context)


def _trackers(cfg: TrainConfig) -> list[str]:
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    chosen = []
    for name in cfg.run.log_with:
        if available.get(name):
            chosen.append(name)
        else:
            log.warning("logging to %s was asked for but it is not installed; skipped", name)
    return chosen


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


# ----- the loop ----------------------------------------------------------------------------------


def train(cfg: TrainConfig, *, source=None) -> dict[str, Any]:
    """Run training as configured; returns a summary (see the end of this function).

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
    check_data_paths(cfg)  # the most fundamental error first: no data at all
    cfg.validate()
    start = check_run_start(cfg)  # OUTPUT free (or --resume / --overwrite) and the checkpoint fits: nothing written yet
    output = Path(cfg.run.output)
    trackers = _trackers(cfg)
    env = launch_env()
    check_single_launch(env)
    memory = estimate_memory(cfg, meta_model(cfg), env.world_size)  # before anything big is allocated
    on_cpu = accelerator_cpu_flag(cfg.run.cpu, env) or not torch.cuda.is_available()
    check_cpu_scale(cfg, memory, torch.device("cpu" if on_cpu else "cuda"), env.world_size, cfg.run.force)
    fresh_accelerator_state()  # an earlier run in this process may have used another precision
    group_timeout = timedelta(seconds=collective_timeout_s(cfg.data.connect_timeout, cfg.data.sample_timeout))
    accelerator = Accelerator(
        mixed_precision=cfg.run.precision, cpu=accelerator_cpu_flag(cfg.run.cpu, env), log_with=trackers or None,
        project_dir=str(output), kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout)],
    )
    device, rank, world_size = accelerator.device, accelerator.process_index, accelerator.num_processes
    check_joined(env, world_size, rank)
    if cfg.data.captions_per_step % world_size:
        raise ConfigError(
            f"config field data.captions_per_step = {cfg.data.captions_per_step}: not divisible by the {world_size} processes"
        )
    local_captions = cfg.data.captions_per_step // world_size
    total_steps, schedule = cfg.total_steps(), start.schedule
    images_per_step = cfg.images_per_step()  # global
    set_seed(cfg.run.seed, device_specific=True)
    if accelerator.is_main_process and cfg.run.overwrite:
        clear_run(output)  # the old run's files go only now, after every check passed

    # Model, optimizer (AdamW, no decay on biases/norms), method, augmentation.
    model, method, augment = build_components(cfg)
    unwrapped = model
    main = accelerator.is_main_process
    bar = main and cfg.run.progress and sys.stderr.isatty()
    status = StatusLog(output / "train.log" if main else None, cfg.run.status_every, echo=main and not bar)
    source_name = cfg.data.source + (f" {' '.join(cfg.data.generators)}" if cfg.data.source == "online"
                                     else f" {' '.join(cfg.data.data)}")
    status.note(
        f"stablerep-train: device {device} ({backend_name()}), world size {world_size}, rank {rank}, "
        f"model {cfg.model.name} {cfg.model.img_size}px ({memory.params / 1e6:.2f} M params, method "
        f"{cfg.method.name}), images per step {images_per_step} ({cfg.data.captions_per_step} captions x "
        f"{' images x '.join(map(str, cfg.views_in_loss()))} crops, {local_captions} captions per rank), {total_steps} steps, source "
        f"{source_name}, output {output}", echo=main)
    status.note(memory.line(), echo=main)
    optimizer = torch.optim.AdamW(
        model.param_groups(cfg.optim.weight_decay, cfg.optim.wd_embeddings), lr=schedule.peak_lr,
        betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        fused=device.type == "cuda",
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.run.compile:  # after the data-parallel wrapper, so that gradient all-reduce overlaps backward
        model.compile()  # in place: state_dict keys stay the same, checkpoints stay portable
    if isinstance(augment, torch.nn.Module):
        augment = augment.to(device)

    # Resume: model, optimizer, RNG and source counters from the checkpoint.
    start_step, images_seen, last_checkpoint, source_state = 0, 0, None, None
    resume_from = start.checkpoint
    if resume_from is not None:
        try:
            state, source_state = load_checkpoint(accelerator, resume_from)
        except RuntimeError as exc:  # load_state_dict: weights of another shape than this model's
            raise ConfigError(f"--resume {resume_from}: {load_error_line(exc)}") from None
        start_step, images_seen = int(state["step"]), int(state.get("images_seen", 0))
        last_checkpoint = resume_from
        status.note(f"resumed from {resume_from} at step {start_step}", echo=main)
        if start.note:
            status.note(start.note, echo=main)
    if main:
        write_config(cfg, output)  # after the resume loaded: a checkpoint that does not fit leaves it as it was
    own_source = source is None
    if own_source:
        source = build_source(cfg, device=device, rank=rank, world_size=world_size, local_captions=local_captions)
    if source_state is not None:
        source.load_state_dict(source_state)

    if trackers:
        accelerator.init_trackers("stablerep", config=_flat(cfg.resolved_dict()))
    progress = tqdm(total=total_steps, initial=start_step, disable=not bar, dynamic_ncols=True, desc="train")

    live = None  # Prometheus endpoint (trainer/live_metrics.py), main process only
    if cfg.run.metrics_port is not None and accelerator.is_main_process:
        from trainer.live_metrics import TrainerMetrics

        live = TrainerMetrics(cfg.run.metrics_port)
        accelerator.print(f"metrics at {live.url}")
    ledger = LossLedger(start_step)  # losses on the device, read back at check steps
    losses = ledger.values
    lrs: list[float] = []
    step_seconds: list[float] = []
    stopped = "completed"
    step = start_step

    def checkpoint(last_loss: float | None) -> Path:
        check_finite()  # never save weights that a non-finite step has touched
        last_loss = ledger.last() if last_loss is None else last_loss
        source_state = prefetch.state_dict()  # not counting the batch drawn ahead
        trainer_state = {
            "images_seen": images_seen, "config": cfg.to_dict(), "loss": last_loss, "lr": schedule(max(step - 1, 0)),
            "lr_schedule": schedule.to_dict(),
            "total_steps": total_steps, "source_stats": source.stats(), "source_state": source_state,
            "rng": {"seed": cfg.run.seed, "states": [f"random_states_{r}.pkl" for r in range(world_size)]},
        }
        return save_checkpoint(
            accelerator, output, step=step, trainer_state=trainer_state, source_state=source_state, model=unwrapped,
        )

    def stopped_for_silence(why: str, last_loss: float | None) -> GeneratorsSilentError:
        """Checkpoint, then the error that ends a run whose generators went silent."""
        return GeneratorsSilentError(f"{why}; stopped after step {step}, checkpoint {checkpoint(last_loss)} "
                                     "(--resume auto continues once generators serve again)")

    def check_finite(bad: tuple[int, float] | None = None) -> None:
        """Raise NonFiniteLossError at ``bad`` (step, loss), or at the first non-finite pending loss."""
        bad = ledger.flush() if bad is None else bad
        if bad is not None:
            raise NonFiniteLossError(bad[0], bad[1], last_checkpoint)

    silent_generators = getattr(source, "silent_generators", None)  # online sources only
    monitor = Monitor(cfg, unwrapped, accelerator, output, status, live)  # k-NN on probe folders (--monitor)
    prefetch = Prefetcher(source, device, limit=total_steps - start_step)
    status.start(start_step)
    try:
        with StopAfterStep() as stop:
            monitor.start(step, images_seen)  # step 0: the random init (Ctrl-C during it stops after step 1)
            while step < total_steps:
                t0 = time.perf_counter()
                lr = schedule(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                # Online: every generator silent for --generator-timeout -> checkpoint, GeneratorsSilentError.
                silent = silent_generators() if silent_generators is not None else None
                try:
                    batch = prefetch.next()  # drawn and copied while the previous step ran
                except GeneratorsSilentError as exc:  # the buffer ran dry as well
                    raise stopped_for_silence(str(exc), None) from None
                with accelerator.autocast():
                    loss, metrics = method(model, batch, augment)
                accelerator.backward(loss)
                ledger.add(loss)

                # Check steps read the losses back (a host-device sync); other steps do not wait.
                stop_now = stop.signal is not None
                generators_silent = silent is not None
                done = step + 1
                check = (done % cfg.run.log_every == 0 or done == total_steps or done % cfg.run.save_every == 0
                         or (world_size == 1 and (stop_now or generators_silent)))
                if check:
                    bad = ledger.flush()
                    if world_size > 1:  # all processes must agree, or the others would hang in the next all-reduce
                        flags = torch.tensor([float(bad is not None), float(stop_now), float(generators_silent)],
                                             device=device)
                        flags = accelerator.reduce(flags, reduction="sum")
                        non_finite, stop_now, generators_silent = (bool(f > 0) for f in flags.tolist())
                        if non_finite and bad is None:
                            bad = (done, math.nan)  # another process's loss
                    check_finite(bad)  # before this step's update
                else:
                    stop_now = generators_silent = False  # several processes: acted on at the next check step
                loss_value = losses[-1] if check else loss.detach()  # a float at check steps, else a device scalar

                grad_norm = None
                if cfg.optim.grad_clip is not None:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                unwrapped.clamp_logit_scale_()  # official: logit scale in [0, ln 100] after every step

                step += 1
                images_seen += images_per_step
                lrs.append(lr)
                step_seconds.append(time.perf_counter() - t0)
                if main:
                    status.step(step, total_steps, loss_value, lr, images_per_step, source.stats,
                                force=step == total_steps or stop_now)
                monitor.after_step(step, images_seen)

                if step % cfg.run.log_every == 0 or step == total_steps:
                    recent = step_seconds[-cfg.run.log_every:]
                    images_per_s = images_per_step * len(recent) / max(sum(recent), 1e-9)
                    source_stats = source.stats()
                    logs = {"train/loss": loss_value, "train/lr": lr, "train/images_per_s": images_per_s,
                            "train/images_seen": images_seen}
                    if grad_norm is not None:
                        logs["train/grad_norm"] = float(grad_norm)
                    logs.update(_numbers("train/", {k: v for k, v in metrics.items() if k != "loss"}))
                    logs.update(_numbers("batch/", batch.meta))
                    logs.update(_numbers("source/", source_stats))
                    accelerator.log(logs, step=step)
                    if live is not None:
                        live.update(step, logs, source_stats)
                    postfix = {"loss": f"{loss_value:.4f}", "lr": f"{lr:.2e}", "img/s": f"{images_per_s:.1f}"}
                    for key in ("reuse_mean", "fresh_fraction_last", "stall_seconds"):
                        if key in source_stats:
                            postfix[key.split("_")[0]] = f"{float(source_stats[key]):.2f}"
                    progress.set_postfix(postfix, refresh=False)
                progress.update(1)

                if step % cfg.run.save_every == 0 and step < total_steps:
                    last_checkpoint = checkpoint(loss_value)
                if generators_silent:
                    raise stopped_for_silence(silent or "every generator silent on another rank", loss_value)
                if stop_now:
                    name = signal.Signals(stop.signal).name if stop.signal is not None else "signal on another rank"
                    stopped = f"interrupted ({name})"
                    break
        monitor.finish(step, images_seen, completed=stopped == "completed")
        if step > start_step or last_checkpoint is None:
            last_checkpoint = checkpoint(None)
        source_stats = source.stats()
        status.note(f"{stopped} at step {step}/{total_steps}; checkpoint {last_checkpoint}", echo=main)
        if main and losses:
            from trainer.run_plots import plot_training_curve

            plot_training_curve(output / "curve.png", losses, lrs=lrs, first_step=start_step + 1,
                                title=f"{cfg.method.name} {cfg.model.name}: steps {start_step + 1}-{step}",
                                **monitor.curve_kwargs())
    finally:
        prefetch.close()
        progress.close()
        if live is not None:
            live.close()
        status.close()
        if own_source:
            source.close()
        accelerator.end_training()

    timed = step_seconds[1:] or step_seconds  # the first step includes warm-up (compile, allocation)
    return {
        "steps": step,
        "start_step": start_step,
        "total_steps": total_steps,
        "images_seen": images_seen,
        "images_per_step": images_per_step,
        "losses": losses,
        "images_per_s": images_per_step * len(timed) / sum(timed) if timed else 0.0,
        "source_stats": source_stats,
        "checkpoint": str(last_checkpoint) if last_checkpoint else None,
        "output": str(output),
        "stopped": stopped,
        "interrupted": stopped.startswith("interrupted"),
        "lrs": lrs,
        "world_size": world_size,
        "device": str(device),
        "monitor": monitor.summary(),
    }
