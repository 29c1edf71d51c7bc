"""What one ``stablerep-bench demo`` run does (:class:`DemoPlan`, from the demo's own flags) and the
trainer configuration it trains with (``demo`` preset < the user's trainer flags < what the demo sets).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from experiments.demo_preset import demo_trainer_flags
from experiments.probe_sets import check_attributes
from experiments.trainer_flags import BadFlags, parse_trainer_config
from infra.cli_parser import SuggestingParser

PROG = "stablerep-bench demo"
DESCRIPTION = "The embedded default, end to end on a CPU: ``stablerep-bench demo [--output DIR]`` (``make demo``)."
DEFAULT_OUTPUT = "runs/demo"


@dataclass
class DemoPlan:
    """What one demo run does; ``--quick`` shrinks every part.

    The first attribute is the headline probe. The demo preset (small_cnn, caption cells that differ
    only in shape or texture, weak augmentation; trainer/presets/demo.yaml) learns colour, shape and
    texture well beyond the random init in the default 2000 CPU steps. The probes train on 400 images
    per class and score 100 per class: with fewer training images the selected classifier overfits
    them and under-reads the same backbone. The measurements behind these defaults:
    benchmarks/RESULTS.md, "Demo: texture +30 reached with 2000 steps and larger probe sets".
    """

    steps: int = 2000
    probe_every: int = 500
    attributes: tuple[str, ...] = ("colour", "background", "texture", "shape")
    captions: int = 576
    probe_train_per_class: int = 400
    probe_val_per_class: int = 100
    generator_workers: int = 1
    seed: int = 0
    probe_epochs: int = 100
    output: str | None = None
    probes_only: bool = False

    @classmethod
    def quick(cls) -> "DemoPlan":
        return cls(steps=100, probe_every=50, attributes=("colour",), probe_train_per_class=20)


def parse_demo_args(argv: list[str]) -> tuple[DemoPlan, list[str]]:
    """Split ``argv`` into the demo's own flags (-> :class:`DemoPlan`) and flags for the trainer."""
    parser = SuggestingParser(prog=PROG, add_help=True, description=DESCRIPTION)
    parser.add_argument("--output", "-o", help=f"run directory (default {DEFAULT_OUTPUT})")
    parser.add_argument("--quick", action="store_true", help="a shorter run (about a minute on 2 CPU cores)")
    parser.add_argument("--probes-only", action="store_true",
                        help="no training: probe the snapshots already in --output (after a stop; finished probes are kept)")
    parser.add_argument("--steps", type=int, help="optimizer steps")
    parser.add_argument("--probe-every", type=int, help="steps between k-NN evaluations of the training backbone (the curve)")
    parser.add_argument("--attributes", help="comma-separated caption attributes to probe; the first is the headline")
    parser.add_argument("--captions", type=int, help="procedural captions to train on (576 distinct)")
    parser.add_argument("--probe-train-per-class", type=int)
    parser.add_argument("--probe-val-per-class", type=int)
    parser.add_argument("--generator-workers", type=int, help="CPU workers of the generator service")
    parser.add_argument("--seed", type=int, help="seed of captions, probe sets, generator and trainer")
    args, rest = parser.parse_known_args(argv)
    plan = DemoPlan.quick() if args.quick else DemoPlan()
    plan.output = args.output
    for name in ("steps", "probe_every", "captions", "probe_train_per_class", "probe_val_per_class",
                 "generator_workers", "seed"):
        value = getattr(args, name)
        if value is not None:
            if value < (0 if name == "seed" else 1):
                parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            setattr(plan, name, value)
    if args.attributes:
        plan.attributes = tuple(a.strip() for a in args.attributes.split(",") if a.strip())
        check_attributes(parser, plan.attributes)
    if args.steps is not None and args.probe_every is None:
        plan.probe_every = max(1, plan.steps // 4)
    plan.probes_only = args.probes_only
    return plan, rest


def demo_trainer_config(plan: DemoPlan, trainer_argv: list[str], endpoint: str, output: Path,
                        probe_dirs: dict[str, Path] | None = None):
    """``demo`` preset < the user's trainer flags < what the demo must set (source, length, output and,
    given ``probe_dirs``, the monitor: k-NN on every probe set every ``probe_every`` steps)."""
    from trainer.config import ConfigError

    argv = [*demo_trainer_flags(trainer_argv), *trainer_argv,
            "--source", "online", "--generators", endpoint, "--output", str(output), "--steps", str(plan.steps),
            "--save-every", str(plan.probe_every), "--seed", str(plan.seed)]
    if probe_dirs:
        argv += ["--monitor-dirs", *map(str, probe_dirs.values()), "--monitor-every", str(plan.probe_every)]
    if "--log-with" not in trainer_argv:
        argv.append("--log-with")  # no trackers unless asked for
    if not any(a == "--resume" or a.startswith("--resume=") for a in trainer_argv):
        argv.append("--overwrite")  # a rerun of the demo replaces its run (its data/ stays)
    cfg, _ = parse_trainer_config(argv)
    if cfg.schedule.warmup_steps is not None and "--warmup-steps" not in trainer_argv:
        cfg.schedule.warmup_steps = min(cfg.schedule.warmup_steps, max(0, plan.steps // 10))
    try:
        return cfg.validate()
    except ConfigError as exc:
        raise BadFlags(str(exc)) from None
