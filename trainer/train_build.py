"""What ``trainer.loop.train`` builds before its first step: checks, accelerator, model, optimizer, resume.

:func:`build_run` runs every check that can refuse a run before anything is written (data paths,
config, OUTPUT free or resumable, the launch, the memory a CPU run would take), then builds the
:class:`~accelerate.Accelerator`, the model, method and augmentation (:func:`build_components`),
AdamW (no decay on biases / norms), loads a checkpoint to resume and writes ``OUTPUT/config.yaml``.
The data source is built by the loop itself (``trainer.loop.build_source``), after this.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed

from trainer.checkpoint import load_checkpoint
from trainer.config import ConfigError, TrainConfig, write_config
from trainer.launch import (
    accelerator_cpu_flag,
    backend_name,
    check_joined,
    check_single_launch,
    collective_timeout_s,
    fresh_accelerator_state,
    launch_env,
)
from trainer.preflight import check_cpu_scale, check_data_paths, estimate_memory
from trainer.resume_check import RunStart, check_run_start, clear_run, load_error_line
from trainer.status import StatusLog
from trainer.trackers import available_trackers


def build_components(cfg: TrainConfig):
    """Model (unwrapped, on CPU), method and augmentation as the config names them."""
    from trainer.augment import GPUAugment
    from trainer.models.stablerep_model import build_model
    from trainer.objectives.methods import METHODS, build_method

    method_kwargs = dict(cfg.method.kwargs)
    if METHODS.get(cfg.method.name).takes_temperature:  # clip has a learned scale
        method_kwargs.setdefault("temperature", cfg.method.temperature)
    method = build_method(cfg.method.name, **method_kwargs)
    m = cfg.model
    model = build_model(
        m.name, img_size=m.img_size, model_kwargs=m.model_kwargs, head_hidden=m.head_hidden, head_out=m.head_out,
        head_layers=m.head_layers if method.needs_head else 0,  # clip uses no SSL head: DDP needs every param used
        sync_bn=m.sync_bn, text=dict(m.text) if method.needs_text else None, head_per_view=m.head_per_view,
    )
    augment = GPUAugment.from_config(cfg.augment, img_size=m.img_size)
    return model, method, augment


def meta_model(cfg: TrainConfig) -> torch.nn.Module:
    """The configured model on the meta device: its shapes without allocating memory."""
    with torch.device("meta"):
        model, _, _ = build_components(cfg)
    return model


@dataclass
class TrainRun:
    """Everything a run holds before its first step; ``start_step`` .. ``source_state`` come from a resume."""

    cfg: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module  # prepared: data-parallel wrapped, compiled with run.compile
    unwrapped: torch.nn.Module  # the model itself: checkpoints, the monitor, the logit-scale clamp
    optimizer: torch.optim.Optimizer
    method: Any  # method(model, batch, augment) -> (loss, metrics)
    augment: Any  # uint8 [N, H, W, 3] -> float [N, 3, S, S], on the device
    schedule: Any  # step -> lr (trainer.resume_check.RunStart.schedule)
    status: StatusLog
    trackers: list[str]  # Accelerate log_with names, installed ones only
    output: Path
    local_captions: int  # caption groups this process draws per step
    total_steps: int
    images_per_step: int  # over all processes
    bar: bool  # a tqdm progress bar (main process on a terminal)
    start_step: int = 0
    images_seen: int = 0
    last_checkpoint: Path | None = None
    source_state: Any = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def build_run(cfg: TrainConfig) -> TrainRun:
    """Check, then build everything but the source; see the module docstring (``train`` lists the errors)."""
    check_data_paths(cfg)  # the most fundamental error first: no data at all
    cfg.validate()
    start = check_run_start(cfg)  # OUTPUT free (or --resume / --overwrite) and the checkpoint fits: nothing written yet
    output = Path(cfg.run.output)
    trackers = available_trackers(cfg.run.log_with)
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
    total_steps, images_per_step = cfg.total_steps(), cfg.images_per_step()  # images: global
    set_seed(cfg.run.seed, device_specific=True)
    if accelerator.is_main_process and cfg.run.overwrite:
        clear_run(output)  # the old run's files go only now, after every check passed

    # Model, optimizer (AdamW, no decay on biases/norms), method, augmentation.
    model, method, augment = build_components(cfg)
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
        model.param_groups(cfg.optim.weight_decay, cfg.optim.wd_embeddings), lr=start.schedule.peak_lr,
        betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        fused=device.type == "cuda",
    )
    prepared, optimizer = accelerator.prepare(model, optimizer)
    if cfg.run.compile:  # after the data-parallel wrapper, so that gradient all-reduce overlaps backward
        prepared.compile()  # in place: state_dict keys stay the same, checkpoints stay portable
    if isinstance(augment, torch.nn.Module):
        augment = augment.to(device)
    run = TrainRun(cfg, accelerator, prepared, model, optimizer, method, augment, start.schedule, status, trackers,
                   output, local_captions, total_steps, images_per_step, bar)
    _resume(run, start)
    if main:
        write_config(cfg, output)  # after the resume loaded: a checkpoint that does not fit leaves it as it was
    return run


def _resume(run: TrainRun, start: RunStart) -> None:
    """Model, optimizer, RNG and source counters from ``start.checkpoint`` (none: a fresh run)."""
    resume_from = start.checkpoint
    if resume_from is None:
        return
    try:
        state, run.source_state = load_checkpoint(run.accelerator, resume_from)
    except RuntimeError as exc:  # load_state_dict: weights of another shape than this model's
        raise ConfigError(f"--resume {resume_from}: {load_error_line(exc)}") from None
    run.start_step, run.images_seen = int(state["step"]), int(state.get("images_seen", 0))
    run.last_checkpoint = resume_from
    run.status.note(f"resumed from {resume_from} at step {run.start_step}", echo=run.main)
    if start.note:
        run.status.note(start.note, echo=run.main)
