"""The paper's comparisons in miniature: ``stablerep-bench study [--output DIR] [--quick] [--seeds N]``.

Every arm trains the same number of steps on the same number of images per step, from the same
generator, and is scored the same way (held-out linear probe per attribute, 5-way 1-shot on the
first attribute; the random init is scored once per seed):

- **method**: ``stablerep`` (the m images of a caption are positives), ``simclr`` (two crops of one
  image) and ``clip`` (image-text), online with unlimited reuse. One-image methods take one image
  per caption, so they get 4x the captions per step (same images per step) and a generator making
  groups of one image at 4x the groups/s (same images/s);
- **fresh vs fixed**: ``stablerep`` online vs offline, offline being K groups written as shards by
  the same generator and read back, with K chosen so that each image is seen about
  ``--offline-reuse`` (9, the paper's offline reuse) times;
- **reuse**: ``stablerep`` online with ``--max-reuse`` 1, 4, 16 (and unlimited: the method arm);
- **closed loop** (``--closed-loop``): ``stablerep`` online with the generator's caption policy
  ``uniform`` vs ``hard`` (steered by the trainer's caption feedback), both held to the offline arm's
  K groups (experiments/study_loop.py); per caption, the groups drawn and generated, their Gini and
  the k-NN accuracy on the probe classes the loop fed least (experiments/study_diversity.py);
  ``online-hard-sharp`` (hard, no floor, alpha 4) runs when ``--arms`` names it.

``--arms NAME ...`` runs only the named arms. Every arm's trainer runs the k-NN monitor on the probe
sets at step 0 and at the end (``knn``: its final top-1 per probe); in a closed-loop study the loop
and offline arms also every quarter of the steps, against the groups received (``curve``,
``study-curve.png``: experiments/study_curve.py). ``summary`` in ``study.json`` holds the mean and std
over seeds of every probe per arm (experiments/study_summary.py).

The generator's images/s is held fixed (``--image-rate``, a throttle), below what the trainer could
draw, so reuse is what changes between the reuse arms (a reuse-1 arm waits for fresh groups).

Writes ``OUTPUT/study.json`` (``arms``: ``{name, method, source, max_reuse, seed, steps,
images_seen (augmented views in the loss: SimCLR's two crops of an image count twice), probe: {attribute: top1},
fewshot, ...}``), ``study.txt`` (a table) and
``study.png``. With weights at hand, the same study runs on a real model and caption file:
``--generator-args "--backend diffusers --model DIR --gpus 0"``, ``--captions FILE`` and
``--probe NAME=DIR`` (an ImageFolder with ``train/`` and ``val/``, instead of the procedural probe
sets); every other flag goes to ``stablerep-train`` on top of the ``demo`` preset.
"""
from __future__ import annotations

import json
import math
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.demo_preset import DEMO_PRESET, demo_trainer_flags
from experiments.generator_process import PROJECT_ROOT, GeneratorProcess, run_generator_cli
from experiments.probe_sets import check_attributes, write_probe_sets
from experiments.snapshot_probes import probe_snapshots
from experiments.snapshots import export_initial_backbone
from experiments.study_curve import CURVE_PNG, curve_every, format_curves, plot_curves, read_curve
from experiments.study_diversity import knn_per_class
from experiments.study_files import plan_dict, resume_study, write_json
from experiments.study_report import format_table, plot
from experiments.study_summary import closed_loop_read, format_summary, summarize
from experiments.study_loop import (
    LOOP_POLICIES, OPTIONAL_LOOP_POLICIES, SHARP_ALPHA, SHARP_FLOOR, CaptionCountingSource, add_policy_arguments,
    diversity_record, generated_per_caption, generator_summary, hard_weights, load_caption_ids, loop_generator_flags,
    loop_record, loop_trainer_flags, policy_weights,
)
from generator_service.caption_policy import DEFAULT_HARD_ALPHA, DEFAULT_HARD_FLOOR
from experiments.trainer_flags import BadFlags, parse_trainer_config
from infra.cli_parser import SuggestingParser
from infra.free_endpoint import free_tcp_endpoint
from infra.machine_facts import machine_facts
from trainer.interrupts import EXIT_INTERRUPTED, Progress, StopSignals

DEFAULT_OUTPUT = "runs/study"
PROG = "stablerep-bench study"


@dataclass(frozen=True)
class StudyArm:
    """One training run of the study: ``max_reuse`` None = unlimited; ``policy``: the generator's
    ``--caption-policy`` of a closed-loop arm (None: the study's ordinary throttled stream)."""

    name: str
    method: str
    source: str
    max_reuse: int | None = None
    policy: str | None = None


@dataclass
class StudyPlan:
    """What ``stablerep-bench study`` runs; ``--quick`` shrinks every part (the tests run it)."""

    steps: int = 300
    seeds: int = 1
    image_rate: float = 64.0       # generator images/s of every online arm (a throttle)
    offline_reuse: float = 9.0     # the paper's offline reuse: K = steps * captions per step / this
    reuses: tuple[int, ...] = (1, 4, 16)
    methods: tuple[str, ...] = ("stablerep", "simclr", "clip")
    attributes: tuple[str, ...] = ("colour", "background", "texture", "shape")
    captions: int = 576
    captions_file: str | None = None
    probes: dict[str, str] = field(default_factory=dict)  # attribute name -> ImageFolder with train/, val/
    probe_train_per_class: int = 100
    probe_val_per_class: int = 25
    probe_epochs: int = 100
    generator_args: list[str] = field(default_factory=list)
    output: str = DEFAULT_OUTPUT
    resume: bool = False
    closed_loop: bool = False       # add the closed-loop arms (experiments/study_loop.py)
    loop_image_rate: float = 16.0   # generator images/s of the closed-loop arms: below the trainer's draws / reuse
    feedback_every: int = 10        # the hard arm's trainer reports caption losses every this many steps
    hard_floor: float = DEFAULT_HARD_FLOOR    # online-hard's generator --hard-floor / --hard-alpha
    hard_alpha: float = DEFAULT_HARD_ALPHA
    sharp_floor: float = SHARP_FLOOR          # online-hard-sharp's
    sharp_alpha: float = SHARP_ALPHA
    only: tuple[str, ...] = ()      # run only these arms (() = all)

    @classmethod
    def quick(cls) -> "StudyPlan":
        return cls(steps=6, reuses=(1,), attributes=("colour",), probe_train_per_class=20,
                   probe_val_per_class=11, probe_epochs=20, feedback_every=2)

    def all_arms(self) -> list[StudyArm]:
        out = [StudyArm(method, method, "online") for method in self.methods]
        out.append(StudyArm("stablerep-offline", "stablerep", "offline"))
        out += [StudyArm(f"stablerep-reuse{r}", "stablerep", "online", r) for r in self.reuses]
        if self.closed_loop:
            out += [StudyArm(name, "stablerep", "online", policy=policy)
                    for name, policy in {**LOOP_POLICIES, **OPTIONAL_LOOP_POLICIES}.items()]
        return out

    def arms(self) -> list[StudyArm]:
        """The arms to run: those ``--arms`` named, else every arm but the optional ones."""
        return [arm for arm in self.all_arms()
                if arm.name in self.only or not self.only and arm.name not in OPTIONAL_LOOP_POLICIES]

    def curve(self, arm: StudyArm) -> bool:
        """Whether ``arm`` runs the monitor every quarter of the steps: the loop and offline arms of a closed-loop study."""
        return self.closed_loop and (arm.policy is not None or arm.source == "offline")


def parse_study_args(argv: list[str]) -> tuple[StudyPlan, list[str]]:
    """Split ``argv`` into the study's own flags (-> :class:`StudyPlan`) and flags for the trainer."""
    parser = SuggestingParser(prog="stablerep-bench study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", "-o", default=DEFAULT_OUTPUT)
    parser.add_argument("--quick", action="store_true", help="a few steps per arm, colour probe only (the tests)")
    parser.add_argument("--resume", action="store_true",
                        help="after a stop: run only the arms the earlier study in --output did not finish (same flags)")
    parser.add_argument("--seeds", type=int, help="repeat every arm with seeds 0..N-1")
    parser.add_argument("--steps", type=int, help="optimizer steps of every arm")
    parser.add_argument("--image-rate", type=float, help="generator images/s of every online arm")
    parser.add_argument("--offline-reuse", type=float, help="times each offline image is seen (sizes K)")
    parser.add_argument("--reuses", type=int, nargs="+", help="--max-reuse of the reuse arms")
    parser.add_argument("--attributes", help="comma-separated procedural attributes to probe; the first is the headline")
    parser.add_argument("--captions", dest="captions_file", help="caption file for the generator (default: procedural)")
    parser.add_argument("--probe", action="append", default=[], metavar="NAME=DIR",
                        help="an ImageFolder with train/ and val/ to probe instead of the procedural sets")
    parser.add_argument("--generator-args", default="", help="extra stablerep-generator flags, one quoted string")
    parser.add_argument("--closed-loop", action="store_true",
                        help="add the arms online-uniform and online-hard (generator caption policy, trainer feedback)")
    parser.add_argument("--loop-image-rate", type=float, help="generator images/s of the closed-loop arms")
    parser.add_argument("--loop-feedback-every", type=int, dest="feedback_every",
                        help="the hard arm's trainer reports caption losses every this many steps")
    add_policy_arguments(parser)
    parser.add_argument("--arms", nargs="+", metavar="NAME",
                        help="run only these arms (names as in study.json; online-hard-sharp runs only when named)")
    args, rest = parser.parse_known_args(argv)
    plan = StudyPlan.quick() if args.quick else StudyPlan()
    plan.output = args.output
    plan.closed_loop = args.closed_loop
    for name in ("seeds", "steps", "feedback_every"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                parser.error(f"--{name.replace('feedback_every', 'loop-feedback-every')} must be >= 1, got {value}")
            setattr(plan, name, value)
    for name in ("image_rate", "offline_reuse", "loop_image_rate"):
        value = getattr(args, name)
        if value is not None:
            if not value > 0:
                parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
            setattr(plan, name, value)
    for name, value in policy_weights(args, parser).items():
        setattr(plan, name, value)
    if args.reuses:
        if min(args.reuses) < 1:
            parser.error(f"--reuses must all be >= 1, got {args.reuses}")
        plan.reuses = tuple(args.reuses)
    if args.attributes:
        plan.attributes = tuple(a.strip() for a in args.attributes.split(",") if a.strip())
    for item in args.probe:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--probe wants NAME=DIR, got {item!r}")
        for split in ("train", "val"):
            if not (Path(folder) / split).is_dir():
                parser.error(f"--probe {item}: {Path(folder) / split} is not a directory")
        plan.probes[name] = folder
    if plan.probes:
        plan.attributes = tuple(plan.probes)
    elif args.attributes:
        check_attributes(parser, plan.attributes)
    if args.arms:
        known = [arm.name for arm in plan.all_arms()]
        unknown = [name for name in args.arms if name not in known]
        if unknown:
            parser.error(f"--arms: unknown arm {', '.join(unknown)} (known with these flags: {', '.join(known)})")
        plan.only = tuple(args.arms)
    plan.captions_file = args.captions_file
    plan.generator_args = shlex.split(args.generator_args)
    plan.resume = args.resume
    return plan, rest


def _geometry(method: str) -> tuple[int, int]:
    """(captions per step, images per caption) of an arm: the demo preset's 16 x 4, or 64 x 1 for
    methods that use one image per caption (the same 64 images per step; the method's own facts,
    ``MethodFacts.one_image_per_caption``, say which)."""
    from trainer.objectives.methods import METHODS

    return (64, 1) if METHODS.get(method).one_image_per_caption() else (16, 4)


def _trainer_config(plan: StudyPlan, trainer_argv: list[str], arm: StudyArm, seed: int, source_flags: list[str],
                    output: Path):
    """``demo`` preset < the user's trainer flags < what the study fixes per arm."""
    import yaml

    from trainer.config import ConfigError, preset_path

    captions_per_step, draw = _geometry(arm.method)
    argv = [*demo_trainer_flags(trainer_argv), *trainer_argv, "--method", arm.method,
            "--captions-per-step", str(captions_per_step), "--draw-per-caption", str(draw), *source_flags,
            "--output", str(output), "--steps", str(plan.steps), "--save-every", str(plan.steps),
            "--seed", str(seed), "--overwrite"]  # a rerun of the study replaces each arm's run
    if arm.max_reuse is not None:
        argv += ["--max-reuse", str(arm.max_reuse)]
    if "--log-with" not in trainer_argv:
        argv.append("--log-with")
    if "--warmup-steps" not in trainer_argv:  # the preset's warmup, at most a tenth of a short run
        preset = yaml.safe_load(preset_path(DEMO_PRESET).read_text())
        argv += ["--warmup-steps", str(min(int(preset["schedule"]["warmup_steps"]), plan.steps // 10))]
    cfg, _ = parse_trainer_config(argv)
    try:
        return cfg.validate()
    except ConfigError as exc:
        raise BadFlags(str(exc)) from None


def _online_flags(plan: StudyPlan, arm: StudyArm, endpoint: str) -> list[str]:
    """Trainer flags of an online arm: the source, and a closed-loop arm's rate contract and feedback."""
    flags = ["--source", "online", "--generators", endpoint]
    if arm.policy is not None:
        flags += loop_trainer_flags(arm.policy, plan.offline_reuse, plan.feedback_every)
    return flags


def _generator_flags(plan: StudyPlan, captions: Path, seed: int, images_per_group: int) -> list[str]:
    return ["--captions", str(captions), "--backend", "procedural", "--gpus", "cpu:1", "--seed", str(seed),
            "--save-size", "64", "--images-per-group", str(images_per_group), "--log-level", "WARNING",
            "--no-progress", *plan.generator_args]


def _train(cfg) -> dict[str, Any]:
    """``trainer.loop.train`` on the source ``cfg`` names; its summary, with ``caption_draws`` (caption id
    -> groups drawn for training) and ``train_seconds``."""
    import torch

    from trainer.loop import build_source, train

    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.run.cpu else "cpu")
    source = CaptionCountingSource(build_source(cfg, device=device, rank=0, world_size=1,
                                                local_captions=cfg.data.captions_per_step))
    try:
        t0 = time.perf_counter()
        summary = train(cfg, source=source)
        summary["train_seconds"] = time.perf_counter() - t0
        summary["caption_draws"] = dict(source.counts)
    finally:
        source.close()
    if summary["interrupted"]:  # the trainer saved a checkpoint and stopped: so does the study
        raise TrainingStopped(summary)
    return summary


class TrainingStopped(KeyboardInterrupt):
    """The trainer stopped on SIGINT/SIGTERM; ``summary`` says at which step."""

    def __init__(self, summary: dict[str, Any]) -> None:
        super().__init__(summary["stopped"])
        self.summary = summary


def _score(backbone_dir: Path, probe_dirs: dict[str, Path], plan: StudyPlan, seed: int, step: int,
           log) -> dict[str, Any]:
    """Linear probe per attribute and 5-way 1-shot on the first attribute's held-out images
    (``step``: the optimizer steps behind ``backbone_dir``, for the log)."""
    from trainer.eval import FewShotConfig, fewshot_probe, load_eval_backbone
    from trainer.eval.features import resolve_device

    rows = probe_snapshots({step: backbone_dir}, probe_dirs, epochs=plan.probe_epochs, seed=seed, log=log)
    headline_val = probe_dirs[plan.attributes[0]] / "val"
    shots = FewShotConfig(n_way=5, k_shot=1, n_query=10, episodes=200, seed=seed)
    fewshot = None
    if len([p for p in headline_val.iterdir() if p.is_dir()]) >= shots.n_way:
        result = fewshot_probe(load_eval_backbone(backbone_dir), headline_val, shots, resolve_device("auto"))
        fewshot = {"accuracy": result["accuracy"], "ci95": result["ci95"]}
    return {"probe": {r["attribute"]: r["top1"] for r in rows}, "fewshot": fewshot}


def _prepare_data(plan: StudyPlan, data: Path, log) -> tuple[Path, dict[str, Path]]:
    """The caption file every arm's generator reads and the probe folders every arm is scored on."""
    data.mkdir(parents=True, exist_ok=True)
    if plan.captions_file:
        captions = Path(plan.captions_file)
    else:
        captions = data / "captions.txt"
        run_generator_cli(["captions", "--n", str(plan.captions), "--out", str(captions), "--seed", "0"])
    if plan.probes:
        return captions, {name: Path(folder) for name, folder in plan.probes.items()}
    probe_dirs = write_probe_sets(plan.attributes, data, plan.probe_train_per_class, plan.probe_val_per_class,
                                  seed=0, reuse=True)
    log(f"probe sets for {', '.join(probe_dirs)} under {data}")
    return captions, probe_dirs


def run_arm(plan: StudyPlan, trainer_argv: list[str], arm: StudyArm, seed: int, captions: Path,
            probe_dirs: dict[str, Path], root: Path, log) -> dict[str, Any]:
    """Train one arm, score its final backbone, return its row of ``study.json``."""
    out = root / f"{arm.name}-seed{seed}"
    if out.exists():  # left by a stopped or earlier study: this arm trains from scratch
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    captions_per_step, draw = _geometry(arm.method)
    images_per_group = draw
    groups_per_s = plan.image_rate / images_per_group
    record: dict[str, Any] = {}
    every = curve_every(plan.steps) if plan.curve(arm) else plan.steps
    monitor = ["--monitor-dirs", *map(str, probe_dirs.values()), "--monitor-every", str(every)]
    generated = None
    if arm.source == "online":
        endpoint = free_tcp_endpoint()
        cfg = _trainer_config(plan, trainer_argv, arm, seed, [*_online_flags(plan, arm, endpoint), *monitor], out)
        rate = plan.image_rate if arm.policy is None else plan.loop_image_rate
        weights = hard_weights(plan, arm.name) if arm.policy == "hard" else None
        extra = (["--max-groups-per-s", f"{groups_per_s:g}"] if arm.policy is None
                 else loop_generator_flags(arm.policy, out, rate, images_per_group, weights))
        command = [*_generator_flags(plan, captions, seed, images_per_group), "--bind", endpoint,
                   "--drain-timeout", "5", *extra]
        log(f"{arm.name} (seed {seed}): online, generator at {rate:g} images/s"
            + (f", caption policy {arm.policy}" if arm.policy else ""))
        with GeneratorProcess(command, log_path=out / "generator.log") as generator:
            summary = _train(cfg)
            generator.check_alive()
        made = generator_summary(out / "generator.log")
        record["groups_generated"] = made.get("groups")
        if arm.policy is not None:
            record.update(policy=arm.policy, **loop_record(summary, made))
            if weights is not None:
                record.update(hard_floor=weights[0], hard_alpha=weights[1])
            generated = generated_per_caption(out, arm.policy, load_caption_ids(captions), made.get("groups"))
        record["groups_received"] = (summary.get("source_stats") or {}).get("groups_received")
    else:
        groups = math.ceil(plan.steps * captions_per_step / plan.offline_reuse)
        shards = out / "shards"
        log(f"{arm.name} (seed {seed}): writing {groups} groups of {images_per_group} to {shards}")
        run_generator_cli([*_generator_flags(plan, captions, seed, images_per_group), "--out", str(shards),
                           "--max-groups", str(groups)], timeout=3600)
        record["offline_groups"] = record["groups_received"] = record["groups_generated"] = groups
        cfg = _trainer_config(plan, trainer_argv, arm, seed,
                              ["--source", "offline", "--data", str(shards), *monitor], out)
        summary = _train(cfg)
    stats = summary.get("source_stats") or {}
    record.update({
        "name": arm.name, "method": arm.method, "source": arm.source, "max_reuse": arm.max_reuse, "seed": seed,
        "steps": int(summary["steps"]), "images_seen": int(summary["images_seen"]),
        "captions_per_step": captions_per_step, "draw_per_caption": draw,
        "train_seconds": summary["train_seconds"], "train_images_per_s": summary["images_per_s"],
        "mean_reuse": stats.get("reuse_mean"), "final_loss": summary["losses"][-1] if summary["losses"] else None,
        "knn": {a: ((summary.get("monitor") or {}).get("last", {}).get(folder.name) or {}).get("knn_top1")
                for a, folder in probe_dirs.items()},
    })
    (out / "caption_counts.json").write_text(json.dumps({"drawn": summary["caption_draws"], "generated": generated}))
    record.update(diversity_record(summary["caption_draws"], captions, plan.attributes, generated))
    if plan.curve(arm):
        record["curve"] = read_curve(out, probe_dirs)
    if plan.closed_loop:
        record["knn_per_class"] = {a: knn_per_class(out, folder) for a, folder in probe_dirs.items()}
    record.update(_score(out, probe_dirs, plan, seed, int(summary["steps"]), log))
    log(f"{arm.name} (seed {seed}): " + ", ".join(f"{k} {v:.1f}%" for k, v in record["probe"].items()))
    return record


def _commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=10)
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_study(argv: list[str]) -> int:
    """Run every arm for every seed (see module docstring); returns the exit status.

    SIGINT/SIGTERM: the arm in training checkpoints and stops; ``study.json`` keeps every finished
    arm, with ``"interrupted": true`` and ``stopped_at``; exit 130. ``--resume`` runs only the arms
    (and random-init scores) that an earlier, stopped run of the same plan did not finish.
    """
    plan, trainer_argv = parse_study_args(list(argv))
    root = Path(plan.output)

    def log(msg: str) -> None:
        print(f"[study] {msg}", flush=True)

    try:  # every flag is checked before any work: the trainer's too
        for arm in [StudyArm("init", "stablerep", "online"), *plan.arms()]:
            if arm.source == "online":
                _trainer_config(plan, trainer_argv, arm, 0, _online_flags(plan, arm, "tcp://127.0.0.1:1"),
                                root / "check")
        study = resume_study(root, plan, trainer_argv) if plan.resume else None
    except BadFlags as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    study = study or {"machine": machine_facts(), "commit": _commit(), "plan": plan_dict(plan),
                      "trainer_flags": trainer_argv, "random_init": [], "arms": []}
    study.update(interrupted=False, stopped_at=None)
    progress = Progress("data")
    with StopSignals() as stop:
        try:
            captions, probe_dirs = _prepare_data(plan, root / "data", log)
            for seed in range(plan.seeds):
                if not any(row["seed"] == seed for row in study["random_init"]):
                    progress.enter("random init", f"seed {seed}")
                    init_arm = StudyArm("init", "stablerep", "online")
                    cfg = _trainer_config(plan, trainer_argv, init_arm, seed, ["--source", "online", "--generators",
                                                                              "tcp://127.0.0.1:1"], root / f"init-seed{seed}")
                    init_dir = export_initial_backbone(cfg, root / f"init-seed{seed}")
                    study["random_init"].append({"seed": seed, **_score(init_dir, probe_dirs, plan, seed, 0, log)})
                for arm in plan.arms():
                    if any(a["name"] == arm.name and a["seed"] == seed for a in study["arms"]):
                        continue  # finished by the run this one resumes
                    progress.enter("arms", f"arm {arm.name}, seed {seed}")
                    study["arms"].append(run_arm(plan, trainer_argv, arm, seed, captions, probe_dirs, root, log))
                    write_json(root / "study.json", study)  # partial results survive a stop
        except KeyboardInterrupt as exc:
            reached = getattr(exc, "summary", None)
            if reached is not None:
                progress.detail += f", training stopped at step {reached['steps']}/{reached['total_steps']}"
            study.update(interrupted=True, stopped_at={**progress.as_dict(), "signal": stop.describe()})
            write_json(root / "study.json", study)
            print(f"{PROG}: interrupted by {stop.describe()} in {progress.where()}; kept {len(study['arms'])} "
                  f"finished arms in {root / 'study.json'}; continue with: stablerep-bench study --resume "
                  f"{' '.join(argv)}", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        except Exception as exc:
            traceback.print_exc()
            print(f"{PROG}: failed in {progress.where()}: {type(exc).__name__}: {exc} (partial results in {root})",
                  file=sys.stderr)
            return 1
    study["seconds"] = study.get("seconds", 0.0) + time.perf_counter() - t_start
    study["summary"] = summarize(study)
    study["closed_loop"] = closed_loop_read(study)
    write_json(root / "study.json", study)
    table = "\n\n".join(part for part in (format_table(study), format_summary(study), format_curves(study)) if part)
    (root / "study.txt").write_text(table + "\n")
    plot(study, root / "study.png")
    curve_png = plot_curves(study, root / CURVE_PNG)
    print(table)
    log(f"{len(study['arms'])} arms in {study['seconds']:.0f} s; wrote {root / 'study.json'}, study.txt, study.png"
        + (f", {CURVE_PNG}" if curve_png else ""))
    return 0
