"""Typed configuration of a training run: dataclasses, YAML presets, validation.

Precedence, lowest to highest: dataclass defaults < preset YAML (``--preset NAME``, a file in
``trainer/presets/``) < config YAML (``--config FILE``) < command-line flags (``trainer/cli.py``).
A higher layer replaces a lower layer's value, except for keyword maps (``model.model_kwargs``,
``method.kwargs``), whose keys merge into the lower layer's.
Two values then follow the method and the augmentation chosen (``build_config``): a method whose
official recipe fixes the images per caption or crops per image (SimCLR 1 and 2, CLIP 1 and 1; see
``trainer.objectives.methods``) gets them unless a config file or a flag sets them (a preset does not count);
and ``augment.scale_min`` from a layer below the one that chose strong / weak augmentation is
dropped, so ``--weak-aug`` over the paper preset crops at the official 0.5-1.
The resolved config is written to ``OUTPUT/config.yaml`` and can be fed back with ``--config``.

YAML files are nested maps whose top-level keys are the groups below (``model``, ``method``,
``augment``, ``data``, ``replay``, ``optim``, ``schedule``, ``run``, ``monitor``); an unknown key, a wrong
type or an out-of-range value is an error that names the file, the field and the value.
The ``augment``, ``data`` and ``replay`` groups are defined beside the parts that read them
(``trainer/augment_config.py``, ``trainer/data/config.py``) and check their own fields.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from trainer.augment_config import AugmentConfig
from trainer.config_checks import (  # noqa: F401  (DEPRECATED_FIELDS, RESOLVED_KEY: re-exported)
    DEPRECATED_FIELDS, RESOLVED_KEY, SPLIT_FIELDS, ConfigError, choices as _choices, fail as _fail, field_choices,
    positive as _positive,
)
from trainer.config_layers import resolve_layers
from trainer.data.config import DataConfig, ReplayConfig
from trainer.trackers import TRACKERS

PRESET_DIR = Path(__file__).resolve().parent / "presets"




def method_names() -> list[str]:
    """The methods ``method.name`` may name: the method registry's (in-tree and installed plugins)."""
    from trainer.objectives.methods import METHODS

    return METHODS.names()


@dataclass
class ModelConfig:
    """Backbone (a timm model name plus its keyword arguments) and projection head."""

    name: str = "vit_base_patch16_224"
    img_size: int = 224  # training resolution (the augmented crop side)
    model_kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments
    head_hidden: int = 4096
    head_out: int = 256
    head_layers: int = 3  # (layers - 1) x Linear-BN-ReLU, then Linear(hidden, out)
    sync_bn: bool = False  # SyncBatchNorm in the head (multi-process runs; official: on)
    head_per_view: bool = False  # head (and its BN) once per view chunk, as the official (paper preset: on)
    text: dict = field(default_factory=dict)  # TextConfig fields for clip / stablerep+ (empty = CLIP B/16 text)


@dataclass
class MethodConfig:
    """Which objective trains the model; ``kwargs`` go to ``build_method`` unchanged."""

    name: str = field(default="stablerep", metadata={"choices": method_names})  # names read on validation
    temperature: float = 0.1
    kwargs: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    """AdamW; the peak lr is ``lr`` when given, else the official rule
    ``base_lr * captions_per_step * n_img / 256 * num_crop / 2`` over the images per caption and crops
    per image that reach the method's loss (``TrainConfig.views_in_loss``)."""

    base_lr: float = 2e-4
    lr: Optional[float] = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to biases and norm parameters
    wd_embeddings: bool = True  # official: decay cls token and position embeddings too (every >= 2-D weight)
    grad_clip: Optional[float] = None  # max global grad norm (None = no clipping)


@dataclass
class ScheduleConfig:
    """Length of the run and the lr schedule: linear warmup, then cosine to ``min_lr``."""

    steps: Optional[int] = None  # exclusive with epochs
    epochs: Optional[float] = None  # needs data.dataset_captions
    warmup_steps: Optional[int] = None  # exclusive with warmup_epochs; default 0
    warmup_epochs: Optional[float] = None
    min_lr: float = 0.0
    # a resume that changes the run length: "continue" = a new cosine from the lr the checkpoint
    # reached down to min_lr at the new end; "replan" = the lr of a run planned with the new length
    resume_lr: str = field(default="continue", metadata=_choices("continue", "replan"))


@dataclass
class RunConfig:
    """Output, precision, checkpointing and logging."""

    output: str = "runs/stablerep"
    precision: str = field(default="bf16", metadata=_choices("bf16", "fp16", "no"))
    seed: int = 0
    save_every: int = 1000  # steps between checkpoints (one is always written at the end)
    resume: Optional[str] = None  # checkpoint dir, or "auto" = OUTPUT/checkpoints/last if present
    overwrite: bool = False  # replace the run already in OUTPUT (its run files are deleted first)
    compile: bool = False  # torch.compile the model
    log_every: int = 10
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])  # names in trainer.trackers.TRACKERS
    progress: bool = True  # progress bar on the main process (plain status lines when False or not a terminal)
    status_every: float = 30.0  # seconds between plain status lines (stdout without a bar, and RUN/train.log)
    cpu: bool = False  # force CPU even when an accelerator is present
    metrics_port: Optional[int] = None  # serve Prometheus metrics (trainer/live_metrics.py) on this port, main process
    force: bool = False  # train paper-scale settings on a CPU anyway (trainer.preflight)


#: the monitor's default subsets per probe: train (the k-NN's bank of neighbours) and val (its queries)
MONITOR_MAX_TRAIN, MONITOR_MAX_VAL = 256, 64


@dataclass
class MonitorConfig:
    """Representation monitor (``trainer/monitor.py``): weighted k-NN of the backbone on probe folders."""

    dirs: list[str] = field(default_factory=list)  # ImageFolders with train/ and val/ ([] = no monitor)
    # steps between evaluations (also at step 0 and the last step); 250: with the default subsets the
    # monitor of the demo's four probe sets stays under 5% of the demo's training (benchmarks/RESULTS.md,
    # "The k-NN monitor: where its images go")
    every: int = 250
    knn_k: int = 20  # neighbours per query (DINO)
    knn_temperature: float = 0.07  # vote weight exp(cosine / T) (DINO)
    linear: bool = False  # also a quick linear probe on the same features
    batch_size: int = 256  # images per feature-extraction batch
    # per probe, a fixed class-balanced subset of each split, drawn once per run (0 = every image): most
    # of the images go to train, the bank of neighbours, whose size sets how close the k-NN reads to
    # the whole folder's; val only needs enough queries per class
    max_train: int = MONITOR_MAX_TRAIN
    max_val: int = MONITOR_MAX_VAL


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    # ----- derived values -------------------------------------------------------------------
    def crop_size(self) -> int:
        """Side of the augmented crops, which is the model's input size."""
        return self.augment.size or self.model.img_size

    def crop_scale_min(self) -> float:
        """Lower RandomResizedCrop scale (``AugmentConfig.crop_scale_min``)."""
        return self.augment.crop_scale_min()

    def augment_summary(self) -> dict:
        """The augmentation as it will run (for ``--print-config``)."""
        return self.augment.summary(self.crop_size())

    def views_in_loss(self) -> tuple[int, int]:
        """(images per caption, crops per image) that reach the method's loss: the method's own
        ``views_in_loss`` of ``data.draw_per_caption`` and ``augment.crops_per_image`` (SimCLR: 1 image,
        >= 2 crops; CLIP: 1 and 1; StableRep: both as configured)."""
        from trainer.objectives.methods import METHODS

        return METHODS.get(self.method.name).views_in_loss(self.data.draw_per_caption, self.augment.crops_per_image)

    def images_per_step(self) -> int:
        """Global augmented images per optimizer step (all processes together) that reach the loss:
        captions_per_step x images per caption x crops per image (see :meth:`views_in_loss`)."""
        images, crops = self.views_in_loss()
        return self.data.captions_per_step * images * crops

    def peak_lr(self) -> float:
        """``optim.lr`` when set, else the official StableRep rule
        ``base_lr * captions_per_step * n_img / 256 * num_crop / 2`` with the method's
        :meth:`views_in_loss` as ``n_img`` and ``num_crop`` (the official script scales by
        ``num_crop / 2``: one crop per image halves the per-256-images rule)."""
        if self.optim.lr is not None:
            return self.optim.lr
        images, crops = self.views_in_loss()
        return self.optim.base_lr * self.data.captions_per_step * images / 256 * crops / 2

    def epoch_captions(self, what: str = "the run length") -> int:
        """Captions in one epoch: ``data.dataset_captions`` when set, else (offline source) the caption
        groups counted in ``data.data`` (``trainer.data.sources.dataset_size``)."""
        if self.data.dataset_captions is not None:
            return self.data.dataset_captions
        if self.data.source != "offline":
            raise ConfigError(f"{what} is given in epochs but data.dataset_captions is not set")
        if not self.data.data:
            raise ConfigError(f"{what} needs the captions per epoch: give the offline data (--data) to count "
                              "them, or data.dataset_captions (--dataset-captions)")
        from trainer.data.sources.dataset_size import count_offline_captions

        try:
            return count_offline_captions(self.data.data, self.data.folders or None, self.data.index_cache)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"config field data.data = {self.data.data!r}: cannot count its caption groups "
                              f"for {what} in epochs: {exc}") from exc

    def steps_per_epoch(self, what: str = "the run length") -> int:
        """Optimizer steps in one epoch, as the official loader (``drop_last``): epoch captions //
        captions_per_step."""
        captions = self.epoch_captions(what)
        steps = captions // self.data.captions_per_step
        if steps < 1:
            raise ConfigError(f"{what}: an epoch of {captions} captions holds no full step of "
                              f"data.captions_per_step = {self.data.captions_per_step}")
        return steps

    def total_steps(self) -> int:
        if self.schedule.steps is not None:
            return self.schedule.steps
        if self.schedule.epochs is not None:
            return max(1, math.ceil(self.schedule.epochs * self.steps_per_epoch("schedule.epochs")))
        raise ConfigError("the run length is not set: give schedule.steps (--steps) or schedule.epochs (--epochs)")

    def warmup_steps(self) -> int:
        if self.schedule.warmup_steps is not None:
            return self.schedule.warmup_steps
        if self.schedule.warmup_epochs is not None:
            return round(self.schedule.warmup_epochs * self.steps_per_epoch("schedule.warmup_epochs"))
        return 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolved_dict(self) -> dict:
        """The config plus the numbers derived from it (steps, warmup, peak lr)."""
        out = self.to_dict()
        out[RESOLVED_KEY] = {
            "total_steps": self.total_steps(),
            "warmup_steps": self.warmup_steps(),
            "peak_lr": self.peak_lr(),
            "images_per_step": self.images_per_step(),
            **({"epoch_captions": self.epoch_captions(), "steps_per_epoch": self.steps_per_epoch()}
               if self.schedule.epochs is not None or self.schedule.warmup_epochs is not None else {}),
            "views_in_loss": dict(zip(("images_per_caption", "crops_per_image"), self.views_in_loss())),
            "augment": self.augment_summary(),
            "head_batchnorm": ("per view chunk" if self.model.head_per_view else "one over all images")
            + (", synchronized across processes" if self.model.sync_bn else ", per process"),
        }
        return out

    # ----- validation -------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Check every field; raise ``ConfigError`` naming the first bad field and its value."""
        for group in dataclasses.fields(self):
            sub = getattr(self, group.name)
            for f in dataclasses.fields(sub):
                value = getattr(sub, f.name)
                choices = field_choices(f.metadata)
                if choices is not None and value not in choices:
                    _fail(f"{group.name}.{f.name}", value, f"must be one of {', '.join(choices)}")
        o, s, run = self.optim, self.schedule, self.run
        for name in ("img_size", "head_hidden", "head_out", "head_layers"):
            _positive(f"model.{name}", getattr(self.model, name))
        _positive("method.temperature", self.method.temperature)
        self.augment.validate(self.model.img_size)
        self.data.validate()
        self.replay.validate()
        _positive("optim.base_lr", o.base_lr)
        _positive("optim.lr", o.lr, optional=True)
        if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
            _fail("optim.betas", o.betas, "must be two numbers in [0, 1)")
        _positive("optim.eps", o.eps)
        if o.weight_decay < 0:
            _fail("optim.weight_decay", o.weight_decay, "must be >= 0")
        _positive("optim.grad_clip", o.grad_clip, optional=True)
        if s.steps is not None and s.epochs is not None:
            _fail("schedule.epochs", s.epochs, "give schedule.steps or schedule.epochs, not both")
        if s.warmup_steps is not None and s.warmup_epochs is not None:
            _fail("schedule.warmup_epochs", s.warmup_epochs, "give warmup_steps or warmup_epochs, not both")
        _positive("schedule.steps", s.steps, optional=True)
        _positive("schedule.epochs", s.epochs, optional=True)
        if s.warmup_steps is not None and s.warmup_steps < 0:
            _fail("schedule.warmup_steps", s.warmup_steps, "must be >= 0")
        if s.warmup_epochs is not None and s.warmup_epochs < 0:
            _fail("schedule.warmup_epochs", s.warmup_epochs, "must be >= 0")
        if s.min_lr < 0:
            _fail("schedule.min_lr", s.min_lr, "must be >= 0")
        total, warmup = self.total_steps(), self.warmup_steps()
        if warmup > total:
            _fail("schedule.warmup_steps", warmup, f"exceeds the run length of {total} steps")
        if s.min_lr > self.peak_lr():
            _fail("schedule.min_lr", s.min_lr, f"exceeds the peak lr {self.peak_lr():g}")
        _positive("run.save_every", run.save_every)
        _positive("run.log_every", run.log_every)
        if run.metrics_port is not None and not 0 <= run.metrics_port <= 65535:
            _fail("run.metrics_port", run.metrics_port, "must be a port number 0..65535")
        _positive("run.status_every", run.status_every)
        for name in run.log_with:
            if name not in TRACKERS:
                _fail("run.log_with", name, f"must be one of {', '.join(TRACKERS)}")
        if not run.output:
            _fail("run.output", run.output, "must be a directory path")
        for name in ("every", "knn_k", "knn_temperature", "batch_size"):
            _positive(f"monitor.{name}", getattr(self.monitor, name))
        for name in ("max_train", "max_val"):
            value = getattr(self.monitor, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _fail(f"monitor.{name}", value, "must be an integer >= 0 (0 = every image)")
        return self


# ----- loading and merging --------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, name: str, origin: str) -> Any:
    """Check/convert one YAML or flag value to the annotated type ``tp``."""
    where = f" (in {origin})" if origin else ""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name, origin)
    base = typing.get_origin(tp) or tp
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str):
            return value
    elif base is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(v, args[0], name, origin) for v in value] if args else list(value)
        if isinstance(value, (str, int, float)) and args:
            return [_coerce(value, args[0], name, origin)]
    elif base is dict:
        if isinstance(value, dict):
            return dict(value)
    raise ConfigError(f"config field {name} = {value!r}{where}: expected {getattr(tp, '__name__', tp)}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def apply_overrides(cfg: TrainConfig, overrides: dict, origin: str = "") -> TrainConfig:
    """Set the fields named in the nested map ``overrides`` (``{group: {field: value}}``)."""
    where = f" in {origin}" if origin else ""
    if not isinstance(overrides, dict):
        raise ConfigError(f"config{where} must be a map of groups, got {type(overrides).__name__}")
    groups = {f.name for f in dataclasses.fields(cfg)}
    for group, values in overrides.items():
        if group == RESOLVED_KEY:
            continue
        if group not in groups:
            raise ConfigError(f"unknown config group {group!r}{where}; known: {', '.join(sorted(groups))}")
        sub = getattr(cfg, group)
        if not isinstance(values, dict):
            raise ConfigError(f"config group {group}{where} must be a map, got {values!r}")
        hints = _hints(type(sub))
        for key, value in values.items():
            key = key.replace("-", "_")
            if (group, key) in DEPRECATED_FIELDS:
                new = DEPRECATED_FIELDS[(group, key)]
                warnings.warn(f"config field {group}.{key}{where} is deprecated; use {group}.{new}", stacklevel=2)
                key = new
            if (group, key) in SPLIT_FIELDS:
                new_keys = SPLIT_FIELDS[(group, key)]
                warnings.warn(f"config field {group}.{key}{where} is deprecated; use "
                              + " and ".join(f"{group}.{k}" for k in new_keys), stacklevel=2)
                for new in new_keys:
                    setattr(sub, new, _coerce(value, hints[new], f"{group}.{key}", origin))
                continue
            if key not in hints:
                raise ConfigError(
                    f"unknown config field {group}.{key}{where}; known: {', '.join(sorted(hints))}"
                )
            value = _coerce(value, hints[key], f"{group}.{key}", origin)
            if isinstance(value, dict):  # keyword maps merge into what lower layers set
                value = {**getattr(sub, key), **value}
            setattr(sub, key, value)
    return cfg


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    return data or {}


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
    return path


def build_config(
    preset: str | None = None, config_file: str | None = None, overrides: dict | None = None,
    validate: bool = True,
) -> TrainConfig:
    """Defaults < preset < config file < ``overrides`` (nested map, e.g. from flags), then the values
    that follow the method, the augmentation and the source (``trainer.config_layers.resolve_layers``);
    validated unless told not."""
    cfg = TrainConfig()
    layers: list[tuple[str, dict]] = []  # (origin, nested map), lowest first
    if preset:
        path = preset_path(preset)
        layers.append((f"preset {preset} ({path})", load_yaml(path)))
    if config_file:
        layers.append((f"config file {config_file}", load_yaml(config_file)))
    if overrides:
        layers.append(("command line", overrides))
    for origin, data in layers:
        apply_overrides(cfg, data, origin=origin)
    resolve_layers(cfg, [data for _, data in layers], preset_first=bool(preset))
    return cfg.validate() if validate else cfg


def from_dict(data: dict) -> TrainConfig:
    """Rebuild a config from ``to_dict()`` / ``config.yaml`` contents."""
    return apply_overrides(TrainConfig(), data, origin="saved config").validate()


def write_config(cfg: TrainConfig, output: str | Path) -> Path:
    """Write the resolved config to ``OUTPUT/config.yaml`` (temp file + rename). ``run.overwrite``
    is written as false: a saved config never carries the permission to replace a run."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    path = output / "config.yaml"
    tmp = output / ".config.yaml.tmp"
    data = cfg.resolved_dict()
    data["run"]["overwrite"] = False
    tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path
