"""One run of ``stablerep-bench demo``, phase by phase, with honest stops.

Phases: ``data`` (captions, probe sets) -> ``training`` (generator subprocess + trainer) ->
``probes`` (a linear probe per attribute of the backbone at random init and at the end; the k-NN
curve in between is the trainer's monitor, ``OUTPUT/monitor.jsonl``) -> ``few-shot``. Whatever stops the run
(SIGINT, SIGTERM, an error) leaves ``OUTPUT/report.json`` with what was finished, marked
``"interrupted": true`` and ``"stopped_at": {"phase", "detail", "signal"}``, prints one line saying
where it stopped, and exits 130 (a signal) or 1 (an error). Finished probes live in
``OUTPUT/probes.json`` and the training summary in ``OUTPUT/train_summary.json``, so
``stablerep-bench demo --probes-only --output OUTPUT`` probes what is left.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from experiments.demo_plan import PROG, DemoPlan, demo_trainer_config
from experiments.generator_process import GeneratorProcess, run_generator_cli
from experiments.probe_sets import write_probe_sets
from experiments.snapshot_probes import (
    FEWSHOT_MIN_PER_CLASS, fewshot_endpoints, load_probe_rows, probe_snapshots, save_probe_rows,
)
from experiments.snapshots import SNAPSHOTS, copy_backbone, export_initial_backbone, find_snapshots
from experiments.trainer_flags import BadFlags
from infra.free_endpoint import free_tcp_endpoint
from trainer.interrupts import EXIT_INTERRUPTED, Progress, StopSignals

GENERATOR_GROUPS_PER_S = 100  # the generator's throttle: above what the demo's trainer draws on 2 cores
TRAIN_SUMMARY = "train_summary.json"


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


class DemoRun:
    """State of one demo run; :meth:`run` returns its exit status."""

    def __init__(self, plan: DemoPlan, trainer_argv: list[str], out: Path) -> None:
        self.plan, self.trainer_argv, self.out = plan, trainer_argv, Path(out)
        self.progress = Progress("data")
        self.summary: dict[str, Any] | None = None
        self.probes: list[dict[str, Any]] = []
        self.fewshot: dict[str, Any] | None = None
        self.timings: dict[str, float] = {}
        self.generator: dict[str, Any] | None = None

    def run(self) -> int:
        t_start = time.perf_counter()
        with StopSignals() as stop:
            try:
                snapshots, probe_dirs = self._data_and_training()
                if self.summary is not None and self.summary.get("interrupted"):
                    self.progress.enter("training", f"step {self.summary['steps']}/{self.summary['total_steps']}")
                    return self._stopped(self.summary["stopped"].split("(")[-1].rstrip(")"))
                self._probe(snapshots, probe_dirs)
            except KeyboardInterrupt:
                return self._stopped(stop.describe())
            except Exception as exc:  # reported with the files produced so far left in place
                traceback.print_exc()
                self._write_report(stopped_by="error", error=f"{type(exc).__name__}: {exc}")
                print(f"{PROG}: failed in {self.progress.where()}: {type(exc).__name__}: {exc} "
                      f"(partial outputs in {self.out})", file=sys.stderr)
                return 1
        self.timings["total_s"] = time.perf_counter() - t_start
        report = self._write_report()
        _print_summary(report, self.plan, self.out)
        return 0

    def _data_and_training(self) -> tuple[dict[int, Path], dict[str, Path]]:
        plan, out = self.plan, self.out
        data = out / "data"
        data.mkdir(parents=True, exist_ok=True)
        for stale in ("probes.json", TRAIN_SUMMARY, "report.json"):  # this run's results replace an old run's
            (out / stale).unlink(missing_ok=True)
        t0 = time.perf_counter()
        self.progress.enter("data", "captions")
        captions = data / "captions.txt"
        run_generator_cli(["captions", "--n", str(plan.captions), "--out", str(captions), "--seed", str(plan.seed)])
        self.progress.enter("data", "probe sets")
        probe_dirs = write_probe_sets(plan.attributes, data, plan.probe_train_per_class,
                                      plan.probe_val_per_class, plan.seed)
        self.timings["data_s"] = time.perf_counter() - t0
        log(f"wrote {plan.captions} captions and probe sets for {', '.join(plan.attributes)} under {data}")

        endpoint = free_tcp_endpoint()
        cfg = demo_trainer_config(plan, self.trainer_argv, endpoint, out, probe_dirs)
        snapshot_dir = out / SNAPSHOTS
        if snapshot_dir.exists():
            shutil.rmtree(snapshot_dir)
        self.progress.enter("training", "step 0 (building the model)")
        snapshots = {0: export_initial_backbone(cfg, snapshot_dir / "step-000000")}
        command = generator_args(plan, cfg, captions, endpoint)
        log(f"starting the procedural generator service at {endpoint}")
        self.progress.enter("training", "connecting to the generator")
        with GeneratorProcess(command, log_path=out / "generator.log") as generator:
            self.generator = {"endpoint": endpoint, "log": str(out / "generator.log"), "command": generator.command,
                              "pid": generator.pid}
            self.progress.enter("training")
            summary = train_online(cfg, generator)
        self.generator["exit_status"] = generator.returncode
        final_step = int(summary["steps"])
        snapshots[final_step] = copy_backbone(out, snapshot_dir / f"step-{final_step:06d}")
        self.timings["generator_connect_s"] = summary.pop("_connect_seconds")
        self.timings["train_s"] = summary.pop("_train_seconds")
        self.summary = summary
        _save_json(out / TRAIN_SUMMARY, {**summary, "timings": self.timings, "generator": self.generator})
        return snapshots, probe_dirs

    def _probe(self, snapshots: dict[int, Path], probe_dirs: dict[str, Path]) -> None:
        t0 = time.perf_counter()
        self.progress.enter("probes")

        def keep(rows: list[dict[str, Any]]) -> None:
            self.probes = list(rows)
            save_probe_rows(self.out, rows)

        self.probes = probe_snapshots(snapshots, probe_dirs, epochs=self.plan.probe_epochs, seed=self.plan.seed,
                                      log=log, done=self.probes, on_row=keep, progress=self.progress)
        headline_val = probe_dirs[self.plan.attributes[0]] / "val"
        if self.plan.probe_val_per_class >= FEWSHOT_MIN_PER_CLASS and len(list(headline_val.iterdir())) >= 5:
            self.fewshot = fewshot_endpoints(snapshots, headline_val, seed=self.plan.seed, log=log,
                                             progress=self.progress)
        self.timings["probe_s"] = time.perf_counter() - t0

    def _stopped(self, signal_name: str) -> int:
        report = self._write_report(stopped_by=signal_name)
        steps = (f", training reached step {report['steps']}/{report['total_steps']}"
                 if self.summary and self.progress.phase != "training" else "")
        print(f"{PROG}: interrupted by {signal_name} in {self.progress.where()}{steps}; kept "
              f"{len(self.probes)} finished probes in {self.out / 'report.json'}; continue with: "
              f"stablerep-bench demo --probes-only --output {self.out}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED

    def _write_report(self, stopped_by: str | None = None, error: str | None = None) -> dict[str, Any]:
        from experiments.demo_report import write_demo_report

        stopped_at = None
        if stopped_by is not None:
            stopped_at = {**self.progress.as_dict(), "signal" if error is None else "error": error or stopped_by}
        elif self.summary is not None and self.summary.get("interrupted"):
            stopped_at = {"phase": "training", "detail": f"step {self.summary['steps']}/{self.summary['total_steps']}",
                          "signal": self.summary.get("stopped")}
        return write_demo_report(self.out, plan=asdict(self.plan), summary=self.summary or {}, probes=self.probes,
                                 timings=self.timings, fewshot=self.fewshot, generator=self.generator,
                                 stopped_at=stopped_at)


def generator_args(plan: DemoPlan, cfg, captions: Path, endpoint: str) -> list[str]:
    """The generator service flags of the demo (``stablerep-generator ARGS``): procedural, throttled, bound to ``endpoint``."""
    return ["--captions", str(captions), "--backend", "procedural", "--gpus", f"cpu:{plan.generator_workers}",
            "--bind", endpoint, "--seed", str(plan.seed), "--save-size", str(cfg.data.image_size or 64),
            "--images-per-group", str(max(cfg.data.draw_per_caption, 4)),
            "--drain-timeout", "5", "--log-level", "WARNING", "--no-progress",
            # The procedural renderer outruns a CPU trainer many times over; unthrottled it takes a
            # core the trainer needs and most of its groups are evicted unseen.
            "--max-groups-per-s", str(GENERATOR_GROUPS_PER_S)]


def train_online(cfg, generator: GeneratorProcess, log=log) -> dict[str, Any]:
    """Build the online source and run ``trainer.loop.train`` fed by ``generator``; its summary (``log``: one
    line per message)."""
    import torch

    from trainer.loop import build_source, train

    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.run.cpu else "cpu")
    source = None
    try:
        t0 = time.perf_counter()
        source = build_source(cfg, device=device, rank=0, world_size=1, local_captions=cfg.data.captions_per_step)
        connect_seconds = time.perf_counter() - t0
        log(f"training {cfg.model.name} {cfg.model.model_kwargs} with {cfg.method.name} for {cfg.schedule.steps} "
            f"steps of {cfg.data.captions_per_step} captions x {cfg.data.draw_per_caption} images")
        t0 = time.perf_counter()
        summary = train(cfg, source=source)
        summary["_train_seconds"] = time.perf_counter() - t0
        summary["_connect_seconds"] = connect_seconds
        generator.check_alive()
        return summary
    except ConnectionError as exc:
        raise ConnectionError(f"{exc}; generator log:\n{generator.log_tail()}") from exc
    finally:
        if source is not None:
            source.close()


def run_probes_only(plan: DemoPlan, trainer_argv: list[str], out: Path) -> int:
    """``stablerep-bench demo --probes-only --output OUT``: probe the snapshots of an earlier run in
    ``OUT`` (its plan, probe sets and training summary), keeping the probes it finished."""
    if trainer_argv:
        print(f"{PROG}: error: --probes-only trains nothing; trainer flags make no sense here: "
              f"{' '.join(trainer_argv)}", file=sys.stderr)
        return 2
    try:
        run = _resumed_run(out)
    except BadFlags as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    snapshots = find_snapshots(out / SNAPSHOTS)
    t_start = time.perf_counter()
    with StopSignals() as stop:
        try:
            run.progress.enter("data", "probe sets")
            probe_dirs = write_probe_sets(run.plan.attributes, out / "data", run.plan.probe_train_per_class,
                                          run.plan.probe_val_per_class, run.plan.seed, reuse=True)
            log(f"probing {len(snapshots)} snapshots (steps {', '.join(map(str, sorted(snapshots)))}) of {out}")
            run._probe(snapshots, probe_dirs)
        except KeyboardInterrupt:
            return run._stopped(stop.describe())
        except Exception as exc:
            traceback.print_exc()
            run._write_report(stopped_by="error", error=f"{type(exc).__name__}: {exc}")
            print(f"{PROG}: failed in {run.progress.where()}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    run.timings["probes_only_total_s"] = time.perf_counter() - t_start
    report = run._write_report()
    _print_summary(report, run.plan, out)
    return 0


def _resumed_run(out: Path) -> DemoRun:
    """The :class:`DemoRun` of the earlier run in ``out``: its plan (report.json), training summary and
    finished probes; :class:`BadFlags` naming what is missing."""
    report_path, summary_path = out / "report.json", out / TRAIN_SUMMARY
    if not summary_path.is_file():
        raise BadFlags(f"{out} holds no trained demo run ({summary_path} is missing); run "
                       f"`stablerep-bench demo --output {out}` first")
    if not report_path.is_file():
        raise BadFlags(f"{report_path} is missing (it holds the run's plan); run the demo again")
    try:
        saved = json.loads(report_path.read_text())
        summary = json.loads(summary_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadFlags(f"cannot read the earlier run in {out}: {exc}") from None
    known = {f.name for f in fields(DemoPlan)}
    plan = DemoPlan(**{k: v for k, v in saved.get("plan", {}).items() if k in known})
    plan.attributes, plan.probes_only, plan.output = tuple(plan.attributes), True, str(out)
    if not find_snapshots(out / SNAPSHOTS):
        raise BadFlags(f"{out / SNAPSHOTS} holds no backbone snapshot to probe")
    run = DemoRun(plan, [], out)
    run.timings = {**summary.pop("timings", {}), **{k: v for k, v in saved.get("timings", {}).items()
                                                    if k.endswith("_s") and k not in ("probe_s", "total_s")}}
    run.generator = summary.pop("generator", None)
    run.summary = summary
    try:
        run.probes = load_probe_rows(out)
    except ValueError as exc:
        raise BadFlags(str(exc)) from None
    return run


def _save_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


def _print_summary(report: dict[str, Any], plan: DemoPlan, out: Path) -> None:
    if report["probe_accuracy"] is not None:
        log(f"probe accuracy ({plan.attributes[0]}, {report['num_classes']} classes, chance "
            f"{report['chance_accuracy']:.1f}%): trained {report['probe_accuracy']:.1f}% vs random init "
            f"{report['random_init_probe_accuracy']:.1f}%")
    for attribute, row in report["per_attribute"].items():
        log(f"  {attribute:>10}: trained {row['trained']:.1f}% | random init {row['random_init']:.1f}%")
    if report["interrupted"]:
        log(f"the training stopped early ({report['stopped_at']['detail']}): the report covers what was trained")
    log(f"{report['steps']} steps, {report['images_seen']} images seen, {report['generated_groups']} groups "
        f"generated, {report['train_images_per_s']:.1f} train images/s; report {out / 'report.json'}, "
        f"curve {out / 'curve.png'}")
