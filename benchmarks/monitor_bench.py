"""The k-NN monitor's cost next to the training it watches, measured in the same run.

    stablerep-bench monitor --steps 500 --every 250 --subsets 384:64 256:64 0:0  # the demo, one run per subset

Each run is the demo's training (``stablerep-bench demo``'s probe sets, procedural generator service
and trainer settings; no probe phase) for ``--steps`` steps with the trainer's monitor on every probe
set every ``--every`` steps, ``--monitor-max-train`` and ``--monitor-max-val`` set to one ``TRAIN:VAL``
of ``--subsets`` (``--max-images N`` adds the run ``N:N``). The
monitor's ``timeline`` (train_summary.json) gives, for each evaluation, its seconds, the seconds it
spent decoding probe images (the first one only) and the training wall seconds since the evaluation
before it, so both sides of the ratio see the same machine load.

Per run: ``first_eval_s`` (step 0, decoding included), ``eval_s`` (mean of the later evaluations),
``train_s_per_interval`` (training wall seconds per ``--every`` steps), ``eval_share`` = eval_s /
train_s_per_interval, and ``demo_share[C]``: the monitor's seconds over the training seconds of the
demo's 2000 steps at cadence ``C`` (step 0, every ``C`` steps, the last step). And what the subset
costs in accuracy: ``knn_top1_full``, the k-NN of the run's last backbone (its exported
``backbone.safetensors``) on every image of each probe set, as ``stablerep-eval knn`` scores it, and
``knn_gap``: the monitor's last evaluation minus that, per probe, and ``knn_gap_mean``: the same for
the mean of 5 draws of the subset (the monitor's is one draw) on the same features (``--no-full``
skips these).
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
    parser.add_argument("--subsets", nargs="+", default=None, metavar="TRAIN:VAL",
                        help="--monitor-max-train:--monitor-max-val of each run, 0 = every image "
                             "(default: the trainer's defaults)")
    parser.add_argument("--max-images", type=int, nargs="+", default=[], metavar="N",
                        help="also a run with --monitor-max-images N (N:N) per value")
    parser.add_argument("--no-full", action="store_true",
                        help="skip scoring each run's last backbone on every probe image")
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
    subsets = parse_subsets(args.subsets, args.max_images)
    from experiments.demo_plan import DemoPlan
    from experiments.probe_sets import check_attributes

    plan = DemoPlan(steps=args.steps, probe_every=args.every, probe_train_per_class=args.probe_train_per_class,
                    probe_val_per_class=args.probe_val_per_class,
                    attributes=tuple(a.strip() for a in args.attributes.split(",") if a.strip()))
    check_attributes(_Refuse(), plan.attributes)
    base = Path(args.output) / (args.name or "monitor")
    load_before = os.getloadavg()
    extra = ["--warmup-steps", "1"] if args.quick else []  # the demo preset warms up for 20 steps
    runs = [monitored_run(plan, base, subset, extra, full=not args.no_full) for subset in subsets]
    results = {"steps": plan.steps, "every": plan.probe_every,
               "attributes": list(plan.attributes), "probe_train_per_class": plan.probe_train_per_class,
               "probe_val_per_class": plan.probe_val_per_class, "load_average_before": list(load_before),
               "load_average_after": list(os.getloadavg()), "goal_share": GOAL_SHARE, "runs": runs}
    bars = {f"{r['max_train']}:{r['max_val']}": 100.0 * r["demo_share"]["250"] for r in runs}
    return results, format_table(results), bars


def parse_subsets(subsets: list[str] | None, max_images: list[int]) -> list[tuple[int, int]]:
    """``["384:64", ...]`` and ``--max-images`` values -> ``[(max_train, max_val), ...]``."""
    from trainer.config import MONITOR_MAX_TRAIN, MONITOR_MAX_VAL

    pairs = []
    for text in subsets or ([] if max_images else [f"{MONITOR_MAX_TRAIN}:{MONITOR_MAX_VAL}"]):
        try:
            train, val = (int(x) for x in text.split(":"))
        except ValueError:
            raise ValueError(f"--subsets {text!r} must be TRAIN:VAL, two integers") from None
        pairs.append((train, val))
    pairs += [(n, n) for n in max_images]
    if any(n < 0 for pair in pairs for n in pair):
        raise ValueError(f"--subsets / --max-images must be >= 0, got {pairs}")
    return pairs


class _Refuse:
    """What :func:`check_attributes` calls ``error`` on: a ``ValueError`` (exit 2)."""

    def error(self, message: str) -> None:
        raise ValueError(message)


def monitored_run(plan, base: Path, subset: tuple[int, int], trainer_argv: list[str] = (),
                  full: bool = True) -> dict[str, Any]:
    """One demo training run with the monitor at ``subset`` (max train, max val images); its costs and,
    with ``full``, its last k-NN against that of every probe image on the run's last backbone."""
    from experiments.demo_plan import demo_trainer_config
    from experiments.demo_run import generator_args, train_online
    from experiments.generator_process import GeneratorProcess, run_generator_cli
    from experiments.probe_sets import write_probe_sets
    from infra.free_endpoint import free_tcp_endpoint

    max_train, max_val = subset
    data, out = base / "data", base / f"subset-{max_train}-{max_val}"
    data.mkdir(parents=True, exist_ok=True)
    captions = data / "captions.txt"
    if not captions.is_file():
        run_generator_cli(["captions", "--n", str(plan.captions), "--out", str(captions), "--seed", str(plan.seed)])
    probe_dirs = write_probe_sets(plan.attributes, data, plan.probe_train_per_class, plan.probe_val_per_class,
                                  plan.seed, reuse=True)
    endpoint = free_tcp_endpoint()
    cfg = demo_trainer_config(plan, [*trainer_argv, "--monitor-max-train", str(max_train), "--monitor-max-val",
                                     str(max_val), "--no-progress"], endpoint, out, probe_dirs)
    started = time.perf_counter()
    with GeneratorProcess(generator_args(plan, cfg, captions, endpoint), log_path=base / "generator.log") as generator:
        summary = train_online(cfg, generator, lambda msg: print(f"[monitor bench] {msg}", flush=True))
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "monitor.jsonl").read_text().splitlines()]
    last = {r["probe"]: r.get("knn_top1") for r in rows if r["step"] == plan.steps}
    scores = {"knn_top1_last": last}
    if full:
        scores["knn_top1_full"], scores["knn_top1_subset_mean"] = full_knn(out, list(probe_dirs.values()), subset)
        scores["knn_gap"] = {p: None if last.get(p) is None else last[p] - v
                             for p, v in scores["knn_top1_full"].items()}
        scores["knn_gap_mean"] = {p: scores["knn_top1_subset_mean"][p] - v for p, v in scores["knn_top1_full"].items()}
    return {"max_train": max_train, "max_val": max_val, "max_images": max_train if max_train == max_val else None,
            "output": str(out), "wall_s": wall,
            "train_images_per_s": summary["images_per_s"], **costs(summary["monitor"]["timeline"], plan.probe_every),
            "images_per_evaluation": sum(r.get("train_images", 0) + r.get("val_images", 0)
                                         for r in rows if r["step"] == 0), **scores}


#: subset draws whose k-NN is averaged for ``knn_top1_subset_mean``
SUBSET_DRAWS = 5


def full_knn(run: Path, probe_dirs: list[Path], subset: tuple[int, int]) -> tuple[dict[str, float], dict[str, float]]:
    """k-NN top-1 of ``run``'s exported backbone (the monitor's k and T) per probe set: on every image, and
    the mean over ``SUBSET_DRAWS`` class-balanced draws (seeds 0, 1, ...) of ``subset`` (max train, max val)
    from the same features (the monitor scores draw 0)."""
    import torch

    from trainer.config import MonitorConfig
    from trainer.eval.backbones import load_eval_backbone
    from trainer.eval.decoded import decode_split, embed_split
    from trainer.eval.features import FeatureSet
    from trainer.eval.imagefolder import balanced_subset
    from trainer.eval.knn import KnnConfig, knn_eval

    backbone, device, cfg = load_eval_backbone(run), torch.device("cpu"), MonitorConfig()
    knn = KnnConfig(k=cfg.knn_k, temperature=cfg.knn_temperature)

    def draw(split, feats: FeatureSet, cap: int, seed: int) -> FeatureSet:
        kept = {str(p) for p, _ in balanced_subset([(Path(p), int(y)) for p, y in zip(split.paths, split.labels)],
                                                   cap, seed)}
        index = torch.tensor([i for i, p in enumerate(split.paths) if p in kept])
        return FeatureSet(feats.features[index], feats.labels[index], feats.class_names, [])

    full, drawn = {}, {}
    for probe in map(Path, probe_dirs):
        train = decode_split(probe / "train", backbone)
        val = decode_split(probe / "val", backbone, classes=train.class_names)
        train_feats, val_feats = embed_split(backbone, train, device), embed_split(backbone, val, device)
        full[probe.name] = knn_eval(train_feats, val_feats, knn)["top1"]
        drawn[probe.name] = sum(knn_eval(draw(train, train_feats, subset[0], seed), draw(val, val_feats, subset[1], seed),
                                         knn)["top1"] for seed in range(SUBSET_DRAWS)) / SUBSET_DRAWS
    return full, drawn


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
             f"{'train:val':>10} {'images':>7} {'step-0 s':>9} {'decode s':>9} {'eval s':>7} "
             f"{'train s/' + str(results['every']):>12} {'eval share':>10} "
             + " ".join(f"{'demo @' + c:>10}" for c in map(str, CADENCES))]
    for r in results["runs"]:
        lines.append(f"{str(r['max_train']) + ':' + str(r['max_val']):>10} {r['images_per_evaluation']:>7} {r['first_eval_s']:>9.2f} "
                     f"{r['decode_s']:>9.2f} {r['eval_s']:>7.2f} {r['train_s_per_interval']:>12.1f} "
                     f"{100 * r['eval_share']:>9.1f}% "
                     + " ".join(f"{100 * r['demo_share'][str(c)]:>9.1f}%" for c in CADENCES))
    for r in results["runs"]:
        if "knn_gap" in r:
            lines.append(f"{r['max_train']}:{r['max_val']} k-NN monitor / mean of {SUBSET_DRAWS} draws / every image: "
                         + ", ".join(f"{p} {r['knn_top1_last'].get(p) or float('nan'):.1f} / "
                                     f"{r['knn_top1_subset_mean'][p]:.1f} / {v:.1f}"
                                     for p, v in r["knn_top1_full"].items()))
    lines.append(f"demo @C: the monitor's seconds (step 0, every C steps) over the training seconds of "
                 f"{DEMO_STEPS} demo steps; goal <= {100 * GOAL_SHARE:.0f}% at 250")
    return "\n".join(lines)
