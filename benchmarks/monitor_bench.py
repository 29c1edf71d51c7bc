"""The k-NN monitor's cost next to the training it watches, measured in the same run.

    stablerep-bench monitor --steps 500 --every 250 --max-images 512 0   # the demo, one run per subset size

Each run is the demo's training (``stablerep-bench demo``'s probe sets, procedural generator service
and trainer settings; no probe phase) for ``--steps`` steps with the trainer's monitor on every probe
set every ``--every`` steps and ``--monitor-max-images`` set to one value of ``--max-images``. The
monitor's ``timeline`` (train_summary.json) gives, for each evaluation, its seconds, the seconds it
spent decoding probe images (the first one only) and the training wall seconds since the evaluation
before it, so both sides of the ratio see the same machine load.

Per run: ``first_eval_s`` (step 0, decoding included), ``eval_s`` (mean of the later evaluations),
``train_s_per_interval`` (training wall seconds per ``--every`` steps), ``eval_share`` = eval_s /
train_s_per_interval, and ``demo_share[C]``: the monitor's seconds over the training seconds of the
demo's 2000 steps at cadence ``C`` (step 0, every ``C`` steps, the last step).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from statistics import mean
from typing import Any

#: the demo's run length and the cadences whose share of it is reported
DEMO_STEPS = 2000
CADENCES = (250, 500, 1000)
#: the goal: at most this share of the demo's training at every 250 steps
GOAL_SHARE = 0.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``stablerep-bench monitor`` flags."""
    parser.add_argument("--steps", type=int, default=500, help="training steps per run (default: %(default)s)")
    parser.add_argument("--every", type=int, default=250, help="steps between evaluations (default: %(default)s)")
    parser.add_argument("--max-images", type=int, nargs="+", default=[512], metavar="N",
                        help="--monitor-max-images of each run, 0 = every image (default: %(default)s)")
    parser.add_argument("--attributes", default="colour,background,texture,shape",
                        help="probe sets, as the demo's (default: %(default)s)")
    parser.add_argument("--probe-train-per-class", type=int, default=400, help="(default: %(default)s, the demo's)")
    parser.add_argument("--probe-val-per-class", type=int, default=100, help="(default: %(default)s, the demo's)")
    parser.add_argument("--quick", action="store_true",
                        help="4 steps, an evaluation every 2, one small probe set (tests the code path)")


def run_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], str, dict[str, float]]:
    """Run with parsed flags; return (results, table, bars in % of training)."""
    if args.quick:
        args.steps, args.every, args.attributes = 4, 2, "colour"
        args.probe_train_per_class, args.probe_val_per_class = 8, 4
    for name in ("steps", "every", "probe_train_per_class", "probe_val_per_class"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps % args.every or args.steps < 2 * args.every:
        raise ValueError(f"--steps {args.steps} must be a multiple of --every {args.every}, at least twice it "
                         "(the ratio needs an evaluation after a full interval of training)")
    if any(n < 0 for n in args.max_images):
        raise ValueError(f"--max-images must be >= 0, got {args.max_images}")
    from experiments.demo_plan import DemoPlan
    from experiments.probe_sets import check_attributes

    plan = DemoPlan(steps=args.steps, probe_every=args.every, probe_train_per_class=args.probe_train_per_class,
                    probe_val_per_class=args.probe_val_per_class,
                    attributes=tuple(a.strip() for a in args.attributes.split(",") if a.strip()))
    check_attributes(_Refuse(), plan.attributes)
    base = Path(args.output) / (args.name or "monitor")
    load_before = os.getloadavg()
    extra = ["--warmup-steps", "1"] if args.quick else []  # the demo preset warms up for 20 steps
    runs = [monitored_run(plan, base, n, extra) for n in args.max_images]
    results = {"steps": plan.steps, "every": plan.probe_every,
               "attributes": list(plan.attributes), "probe_train_per_class": plan.probe_train_per_class,
               "probe_val_per_class": plan.probe_val_per_class, "load_average_before": list(load_before),
               "load_average_after": list(os.getloadavg()), "goal_share": GOAL_SHARE, "runs": runs}
    bars = {f"max-images {r['max_images']}": 100.0 * r["demo_share"]["250"] for r in runs}
    return results, format_table(results), bars


class _Refuse:
    """What :func:`check_attributes` calls ``error`` on: a ``ValueError`` (exit 2)."""

    def error(self, message: str) -> None:
        raise ValueError(message)


def monitored_run(plan, base: Path, max_images: int, trainer_argv: list[str] = ()) -> dict[str, Any]:
    """One demo training run with the monitor at ``--monitor-max-images max_images``; its costs."""
    from experiments.demo_plan import demo_trainer_config
    from experiments.demo_run import generator_args, train_online
    from experiments.generator_process import GeneratorProcess, run_generator_cli
    from experiments.probe_sets import write_probe_sets
    from infra.free_endpoint import free_tcp_endpoint

    data, out = base / "data", base / f"max-images-{max_images}"
    data.mkdir(parents=True, exist_ok=True)
    captions = data / "captions.txt"
    if not captions.is_file():
        run_generator_cli(["captions", "--n", str(plan.captions), "--out", str(captions), "--seed", str(plan.seed)])
    probe_dirs = write_probe_sets(plan.attributes, data, plan.probe_train_per_class, plan.probe_val_per_class,
                                  plan.seed, reuse=True)
    endpoint = free_tcp_endpoint()
    cfg = demo_trainer_config(plan, [*trainer_argv, "--monitor-max-images", str(max_images), "--no-progress"], endpoint,
                          out, probe_dirs)
    started = time.perf_counter()
    with GeneratorProcess(generator_args(plan, cfg, captions, endpoint), log_path=base / "generator.log") as generator:
        summary = train_online(cfg, generator, lambda msg: print(f"[monitor bench] {msg}", flush=True))
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "monitor.jsonl").read_text().splitlines()]
    return {"max_images": max_images, "output": str(out), "wall_s": wall,
            "train_images_per_s": summary["images_per_s"], **costs(summary["monitor"]["timeline"], plan.probe_every),
            "images_per_evaluation": sum(r.get("train_images", 0) + r.get("val_images", 0)
                                         for r in rows if r["step"] == 0),
            "knn_top1_last": {r["probe"]: r.get("knn_top1") for r in rows if r["step"] == plan.steps}}


def costs(timeline: list[dict[str, Any]], every: int) -> dict[str, Any]:
    """The ratios of the module docstring from a monitor's ``timeline`` (evaluations every ``every`` steps)."""
    first = timeline[0]
    later = [t for t in timeline[1:] if t["train_seconds"] is not None]
    if first["step"] != 0 or not later:
        raise ValueError(f"the monitor's timeline {timeline} has no step-0 evaluation and later ones")
    train_per_interval = mean(t["train_seconds"] * every / (t["step"] - prev["step"])
                              for prev, t in zip(timeline, timeline[1:]) if t["train_seconds"] is not None)
    eval_s = mean(t["seconds"] for t in later)
    demo_train = DEMO_STEPS / every * train_per_interval
    demo_share = {str(c): (first["seconds"] + DEMO_STEPS // c * eval_s) / demo_train for c in CADENCES}
    return {"first_eval_s": first["seconds"], "decode_s": first["decode_seconds"], "eval_s": eval_s,
            "eval_s_each": [t["seconds"] for t in later], "train_s_per_interval": train_per_interval,
            "eval_share": eval_s / train_per_interval, "demo_share": demo_share}


def format_table(results: dict[str, Any]) -> str:
    lines = [f"k-NN monitor vs training, {results['steps']} demo steps per run, an evaluation every "
             f"{results['every']} steps; load average {results['load_average_before'][0]:.1f} -> "
             f"{results['load_average_after'][0]:.1f}",
             f"{'max-images':>10} {'images':>7} {'step-0 s':>9} {'decode s':>9} {'eval s':>7} "
             f"{'train s/' + str(results['every']):>12} {'eval share':>10} "
             + " ".join(f"{'demo @' + c:>10}" for c in map(str, CADENCES))]
    for r in results["runs"]:
        lines.append(f"{r['max_images']:>10} {r['images_per_evaluation']:>7} {r['first_eval_s']:>9.2f} "
                     f"{r['decode_s']:>9.2f} {r['eval_s']:>7.2f} {r['train_s_per_interval']:>12.1f} "
                     f"{100 * r['eval_share']:>9.1f}% "
                     + " ".join(f"{100 * r['demo_share'][str(c)]:>9.1f}%" for c in CADENCES))
    lines.append(f"demo @C: the monitor's seconds (step 0, every C steps) over the training seconds of "
                 f"{DEMO_STEPS} demo steps; goal <= {100 * GOAL_SHARE:.0f}% at 250")
    return "\n".join(lines)
