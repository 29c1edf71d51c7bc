"""What the representation learns while it trains: weighted k-NN of the live backbone on probe folders.

``stablerep-train --monitor DIR [DIR ...] --monitor-every STEPS``: at step 0 (the random init), every
``STEPS`` steps and at the last step of a completed run, the backbone (the one training, frozen for
the evaluation: eval mode, inference mode, its train mode restored afterwards) embeds the ``train/`` and
``val/`` images of every probe folder in batches on the training device, and each val image is
classified by weighted k-NN against the train images (``trainer/eval/knn.py``, the scorer of
``stablerep-eval knn``). ``--monitor-linear`` adds the quick linear probe of ``stablerep-eval linear``
(one short grid, selected on a held-out part of train) on the same features.

The probe images are decoded once per run, resized and centre-cropped to the model's input as
``stablerep-eval`` does, and kept as uint8 (``trainer/eval/decoded.py``); each evaluation normalizes
them in batches on the device (inference mode, channels-last). An undecodable image is skipped and
counted. The global RNG state is saved and restored around an evaluation, so a run with a monitor
trains exactly as the same run without one. The step-0 evaluation runs before ``trainer.loop.train``
builds its data source (an online source would fill its replay buffer meanwhile, on the same cores);
a source built by the caller and passed in has started already.

``--monitor-max-train N`` (default 256) and ``--monitor-max-val M`` (default 64): each probe's train
split is a class-balanced subset of at most ``N`` images and its val split one of at most ``M``
(``N // classes`` per class, at least one), drawn once per run with a fixed seed, so every
evaluation, and every run on the same folders, scores the same images; their files are listed in
``OUTPUT/monitor_images.json``. ``0`` scores every image of the split, as ``stablerep-eval knn``
does; ``--monitor-max-images N`` sets both. The budget goes mostly to train: the k-NN's bank of
neighbours, whose density sets how close a subset reads to the whole folder on the same backbone (a
sparser bank reads lower), while the val subset only adds sampling noise. The defaults (every 250
steps) keep the monitor of the demo's four probe sets under 5% of the training time
(``stablerep-bench monitor``; benchmarks/RESULTS.md, "The k-NN monitor: where its images go"). Its
numbers still read below the whole folder's: compare a monitor's numbers with each other, and with
``stablerep-eval knn`` only on the listed files.

Results: one line per probe and evaluation in ``OUTPUT/monitor.jsonl``
(``{"step", "probe", "knn_top1", "linear_top1"?, "images_seen", "groups_received"?, "seconds", "train_images",
"train_files", ...}``: ``train_images`` scored of the split's ``train_files``; ``groups_received``: the
distinct caption groups the training source has had so far on this rank, what the source's
``groups_received()`` says (online: groups inserted into the replay buffer; offline: the groups of
the first epoch, since later epochs read them again; 0 at step 0 of a fresh run; absent for a
source without that method); a failed evaluation
is a line with ``"error"`` instead of the accuracies: a warning, and training goes on), a line in the
status output and ``train.log`` (``monitor step 250: knn colour 87.5 | knn shape 40.2 (3.1 s)``),
tracker scalars ``monitor/<probe>/knn_top1``, the Prometheus gauge
``stablerep_trainer_knn_top1{probe="<probe>"}``, a second panel of ``curve.png`` and the ``monitor``
entry of the run's summary (with ``timeline``: each evaluation's seconds, its decoding seconds and
the training wall seconds since the evaluation before it).

With several processes, rank 0 evaluates while the other ranks wait at a barrier (the probe sets of
a monitor are small next to training; see benchmarks/RESULTS.md for the measured cost).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.eval.backbones import IMAGENET_MEAN, IMAGENET_STD, EvalBackbone
from trainer.eval.decoded import DecodedSplit, decode_split, embed_split
from trainer.eval.features import FeatureSet
from trainer.eval.knn import KnnConfig, knn_eval
from trainer.eval.linear import FastProbeConfig, fast_linear_probe

log = logging.getLogger(__name__)

MONITOR_FILE = "monitor.jsonl"
#: with ``--monitor-max-train`` / ``--monitor-max-val``: the files of each probe's subset, written when they are first decoded
MONITOR_IMAGES = "monitor_images.json"
#: the quick linear probe of ``--monitor-linear``: one weight decay, three lrs, 50 epochs, holdout selection
QUICK_LINEAR = FastProbeConfig(lrs=(0.01, 0.1, 1.0), weight_decays=(0.0,), epochs=50)


@dataclass
class Probe:
    """A probe folder and, after the first evaluation, its decoded splits."""

    root: Path
    train: DecodedSplit | None = None
    val: DecodedSplit | None = None
    decode_seconds: float = 0.0

    @property
    def name(self) -> str:
        return self.root.name

    def decoded(self, backbone: EvalBackbone, max_train: int = 0,
                max_val: int = 0) -> tuple[DecodedSplit, DecodedSplit]:
        """The splits, decoded at the first call (a cap > 0: that split is a class-balanced subset)."""
        if self.train is None or self.val is None:
            start = time.perf_counter()
            self.train = decode_split(self.root / "train", backbone, max_images=max_train)
            self.val = decode_split(self.root / "val", backbone, classes=self.train.class_names,
                                    max_images=max_val)
            self.decode_seconds = time.perf_counter() - start
        return self.train, self.val

    def images(self) -> dict[str, Any]:
        """The files the evaluations score (undecodable ones included), per split."""
        return {"root": str(self.root),
                **{name: sorted(split.paths + split.skipped) for name, split in (("train", self.train),
                                                                                ("val", self.val)) if split}}


class Monitor:
    """The monitor of one run. Every process calls :meth:`start`, :meth:`after_step` and :meth:`finish`
    at the same steps (they meet at a barrier when there are several); only the main process evaluates
    and writes. Without ``monitor.dirs`` every method does nothing."""

    def __init__(self, cfg, model: torch.nn.Module, accelerator, output: Path, status) -> None:
        self.cfg, self.accelerator, self.status, self.live = cfg.monitor, accelerator, status, None
        self.enabled = bool(self.cfg.dirs)
        self.main = accelerator.is_main_process
        self.path = Path(output) / MONITOR_FILE
        self.knn = KnnConfig(k=self.cfg.knn_k, temperature=self.cfg.knn_temperature)
        self.probes = [Probe(Path(d)) for d in self.cfg.dirs]
        self.records: list[dict[str, Any]] = []
        self.failures, self.seconds = 0, 0.0
        self.timeline: list[dict[str, Any]] = []  # per evaluation: seconds, decode and training seconds before it
        self._last_end: float | None = None
        self.logs_attached = False  # trackers and live metrics: set up after step 0's evaluation
        self._pending_scalars: list[tuple[dict[str, float], int]] = []  # logged before they were
        self.first_step, self.last_evaluated = 0, -1  # of this process's session: the same on every rank
        self.source: Any = None  # the training source, once :meth:`watch` was called (its ``groups_received()``)
        self.backbone = EvalBackbone(
            model=model.backbone, name=cfg.model.name, model_kwargs=dict(cfg.model.model_kwargs),
            input_size=cfg.crop_size(), mean=IMAGENET_MEAN, std=IMAGENET_STD,
            num_features=int(model.num_features), source="the training backbone",
        )

    # ----- the hooks the loop calls -----------------------------------------------------------
    def watch(self, source: Any) -> None:
        """The training source whose ``groups_received()`` (if it has one) every row records."""
        self.source = source

    def start(self, step: int, images_seen: int) -> None:
        """Before the first step: keep the records of the run resumed (steps <= ``step``), evaluate step 0."""
        if not self.enabled:
            return
        self.first_step = step
        if self.main:
            self._keep_records_up_to(step)
            self._last_end = time.perf_counter() if step > 0 else None
        if step == 0:
            self._evaluate(step, images_seen)

    def attach_logs(self, live) -> None:
        """The run's trackers are initialized and ``live`` (its Prometheus metrics, or None) serves: what
        the evaluations so far (step 0, which runs before them) logged goes to them now, the rest as it comes."""
        self.live, self.logs_attached = live, True
        for scalars, step in self._pending_scalars:
            self.accelerator.log(scalars, step=step)
        self._pending_scalars = []
        if live is not None and self.records:
            last = max(r["step"] for r in self.records)
            live.set_monitor([r for r in self.records if r["step"] == last], self.failures)

    def after_step(self, step: int, images_seen: int) -> None:
        if self.enabled and step % self.cfg.every == 0:
            self._evaluate(step, images_seen)

    def finish(self, step: int, images_seen: int, completed: bool) -> None:
        """The last step of a completed run that trained in this session, unless it was just evaluated."""
        if self.enabled and completed and step > self.first_step and step != self.last_evaluated:
            self._evaluate(step, images_seen)

    # ----- results ----------------------------------------------------------------------------
    def curve_kwargs(self) -> dict[str, Any]:
        """``plot_training_curve`` arguments of the accuracy panel: k-NN top-1 against step per probe."""
        curves, chance, initial = {}, {}, {}
        for probe in self.probes:
            rows = sorted((r for r in self.records if r["probe"] == probe.name and "knn_top1" in r),
                          key=lambda r: r["step"])
            if not rows:
                continue
            label = f"{probe.name} ({rows[-1]['num_classes']} classes)"
            curves[label] = ([r["step"] for r in rows], [r["knn_top1"] for r in rows])
            chance[label] = 100.0 / rows[-1]["num_classes"]
            if rows[0]["step"] == 0:
                initial[label] = rows[0]["knn_top1"]
        if not curves:
            return {}
        return {"probe_curves": curves, "chance_accuracy": chance, "initial_accuracy": initial,
                "accuracy_title": f"k-NN (k={self.knn.k}, T={self.knn.temperature:g}) on held-out images"
                                  + (f" (subsets: {self._subsets()})" if self._subsampled() else ""),
                "legend_title": "probe folder"}

    def _subsets(self) -> str:
        caps = {"train": self.cfg.max_train, "val": self.cfg.max_val}
        return ", ".join(f"{caps[name]} {name}" if caps[name] else f"all {name}" for name in caps)

    def _subsampled(self) -> bool:
        """Whether some split scored fewer of its files than it has (a ``--monitor-max-train/val`` subset)."""
        return any(split.files > len(split) + len(split.skipped)
                   for probe in self.probes for split in (probe.train, probe.val) if split is not None)

    def summary(self) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        last = {}
        for record in self.records:
            if "knn_top1" in record:
                last[record["probe"]] = {k: record[k] for k in ("step", "knn_top1", "linear_top1") if k in record}
        return {"file": str(self.path), "every": self.cfg.every, "knn_k": self.knn.k,
                "knn_temperature": self.knn.temperature, "max_train": self.cfg.max_train,
                "max_val": self.cfg.max_val,
                "evaluations": len({r["step"] for r in self.records}), "failures": self.failures,
                "seconds": self.seconds, "timeline": self.timeline, "last": last}

    # ----- evaluation -------------------------------------------------------------------------
    def _evaluate(self, step: int, images_seen: int) -> None:
        self.last_evaluated = step
        if self.main:
            start = time.perf_counter()
            undecoded = [p for p in self.probes if p.train is None]
            rows = self._evaluate_all(step, images_seen)
            groups = self._groups_received(step)
            if groups is not None:
                for row in rows:
                    row["groups_received"] = groups
            end = time.perf_counter()
            seconds = end - start
            self.seconds += seconds
            self.timeline.append({"step": step, "seconds": seconds,
                                  "decode_seconds": sum(p.decode_seconds for p in undecoded),
                                  "train_seconds": None if self._last_end is None else start - self._last_end})
            self._last_end = end
            if (self.cfg.max_train or self.cfg.max_val) and any(p.train is not None for p in undecoded):
                self._write_images()
            self._publish(step, rows, seconds)
        if self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()

    def _evaluate_all(self, step: int, images_seen: int) -> list[dict[str, Any]]:
        model = self.backbone.model
        was_training = model.training
        device = self.accelerator.device
        rows = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            try:
                for probe in self.probes:
                    rows.append(self._evaluate_probe(probe, step, images_seen, device))
            finally:
                model.train(was_training)
        return rows

    def _evaluate_probe(self, probe: Probe, step: int, images_seen: int, device: torch.device) -> dict[str, Any]:
        start = time.perf_counter()
        row: dict[str, Any] = {"step": step, "probe": probe.name}
        try:
            train, val = probe.decoded(self.backbone, self.cfg.max_train, self.cfg.max_val)
            train_feats = embed_split(self.backbone, train, device, self.cfg.batch_size)
            val_feats = embed_split(self.backbone, val, device, self.cfg.batch_size)
            row["knn_top1"] = knn_eval(train_feats, val_feats, self.knn, device)["top1"]
            if self.cfg.linear:
                row["linear_top1"] = self._linear_top1(train_feats, val_feats, device)
            row.update(num_classes=len(train.class_names), train_images=len(train), val_images=len(val),
                       skipped_images=len(train.skipped) + len(val.skipped), train_files=train.files,
                       val_files=val.files)
        except Exception as err:  # noqa: BLE001 - a failed evaluation must not end the run
            self.failures += 1
            row["error"] = f"{type(err).__name__}: {err}"
            log.warning("monitor: evaluation of probe %s at step %d failed (training goes on): %s",
                        probe.name, step, row["error"])
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row.update(images_seen=images_seen, seconds=time.perf_counter() - start)
        return row

    def _groups_received(self, step: int) -> int | None:
        """What the watched source has received (None: it does not say); 0 before a fresh run's source exists."""
        if self.source is None:
            return 0 if step == 0 else None
        count = getattr(self.source, "groups_received", None)
        return int(count()) if callable(count) else None

    @staticmethod
    def _linear_top1(train: FeatureSet, val: FeatureSet, device: torch.device) -> float:
        return float(fast_linear_probe(train, val, QUICK_LINEAR, device)["top1"])

    def _publish(self, step: int, rows: list[dict[str, Any]], seconds: float) -> None:
        self.records.extend(rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        parts, scalars = [], {}
        for row in rows:
            if "error" in row:
                parts.append(f"{row['probe']} failed")
                continue
            parts.append(f"knn {row['probe']} {row['knn_top1']:.1f}"
                         + (f" linear {row['linear_top1']:.1f}" if "linear_top1" in row else ""))
            scalars.update({f"monitor/{row['probe']}/{k}": row[k] for k in ("knn_top1", "linear_top1") if k in row})
        self.status.note(f"monitor step {step}: {' | '.join(parts)} ({seconds:.1f} s)")
        scalars["monitor/seconds"] = seconds
        if not self.logs_attached:
            self._pending_scalars.append((scalars, step))
            return
        self.accelerator.log(scalars, step=step)
        if self.live is not None:
            self.live.set_monitor(rows, self.failures)

    def _write_images(self) -> None:
        path = self.path.with_name(MONITOR_IMAGES)
        tmp = path.with_name(f".{MONITOR_IMAGES}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({p.name: p.images() for p in self.probes if p.train is not None}, indent=1),
                       encoding="utf-8")
        tmp.replace(path)

    def _keep_records_up_to(self, step: int) -> None:
        """A fresh run starts an empty ``monitor.jsonl``; a resumed one keeps the lines up to its step."""
        kept = []
        if step > 0 and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                    kept.append(row)
        self.records = kept
        self.failures = sum("error" in r for r in kept)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{MONITOR_FILE}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(self.path)

