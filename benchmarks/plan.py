"""Capacity planner: generator GPUs per trainer GPU for a target reuse, and the stall at other ratios.

Quantities (all per GPU, steady state):

- ``G``: images one generator GPU makes per second;
- ``T``: images one trainer GPU consumes per second when never starved (images per step / step time);
- ``r``: reuse, the number of times each generated image is drawn by the trainer on average (the
  paper's offline recipe shows each image about 9 times: the default);
- ``k``: generator GPUs per trainer GPU.

Generators supply ``k G`` fresh images/s; at reuse ``r`` they feed ``r k G`` trained images/s. So

- the ratio that feeds the trainer exactly is ``k* = T / (r G)``;
- at any ``k``, trainer speed = ``min(T, r k G)``, stall fraction = ``max(0, 1 - r k G / T)``;
- surplus fraction = ``max(0, 1 - T / (r k G))``: the share of generated images the trainer cannot
  draw ``r`` times; with credit backpressure it is generator idle time, without it it shows up as
  groups evicted before reaching ``r`` draws (lower mean reuse).

Rates come from flags or from the JSON written by ``stablerep-bench generator`` (``G``: the service
pool path), ``trainer`` (``T``: the fed step) or ``online`` (both, corrected for measured stall and
idle: ``G = generated/s / (generators x (1 - idle))``, ``T = trainer images/s / (1 - stall)``), or from a
live run's metrics endpoints (``--live-trainer URL --live-generator URL ...``, `benchmarks.live_plan`),
which also says which side to grow and by how many GPUs.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

DEFAULT_REUSE = 9.0
DEFAULT_RATIO_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def stall_fraction(ratio: float, generator_rate: float, trainer_rate: float, reuse: float) -> float:
    """Share of trainer time spent waiting for data with ``ratio`` generator GPUs per trainer GPU."""
    return max(0.0, 1.0 - reuse * ratio * generator_rate / trainer_rate)


def surplus_fraction(ratio: float, generator_rate: float, trainer_rate: float, reuse: float) -> float:
    """Share of generator output beyond what the trainer can draw ``reuse`` times (idle or evicted)."""
    supply = reuse * ratio * generator_rate
    return max(0.0, 1.0 - trainer_rate / supply) if supply > 0 else 0.0


def plan(generator_rate: float, trainer_rate: float, reuse: float = DEFAULT_REUSE,
         ratios: list[float] | None = None, reuses: list[float] | None = None, trainer_gpus: int = 1) -> dict[str, Any]:
    """The recommended ratio and tables of stall / surplus against ratio and against reuse."""
    for name, value in (("generator rate", generator_rate), ("trainer rate", trainer_rate), ("reuse", reuse)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"plan: {name} must be a positive number, got {value!r}")
    if trainer_gpus < 1:
        raise ValueError(f"plan: --trainer-gpus must be >= 1, got {trainer_gpus}")
    ratio = trainer_rate / (reuse * generator_rate)
    generator_gpus = math.ceil(ratio * trainer_gpus - 1e-9)
    if ratios is None:
        ratios = sorted({round(ratio * f, 6) for f in DEFAULT_RATIO_FACTORS} | {generator_gpus / trainer_gpus})
    if reuses is None:
        reuses = sorted({1.0, 2.0, 4.0, reuse, 2 * reuse, 4 * reuse})
    at_ratio = generator_gpus / trainer_gpus

    def row(k: float, r: float) -> dict[str, float]:
        return {"generators_per_trainer": k, "reuse": r,
                "trainer_stall_fraction": stall_fraction(k, generator_rate, trainer_rate, r),
                "generator_surplus_fraction": surplus_fraction(k, generator_rate, trainer_rate, r),
                "trainer_images_per_s": min(trainer_rate, r * k * generator_rate)}

    return {
        "generator_images_per_s": generator_rate,
        "trainer_images_per_s": trainer_rate,
        "reuse": reuse,
        "generators_per_trainer": ratio,
        "trainer_gpus": trainer_gpus,
        "generator_gpus": generator_gpus,
        "fresh_images_per_s_needed": trainer_gpus * trainer_rate / reuse,
        "by_ratio": [row(k, reuse) for k in ratios],
        "by_reuse": [row(at_ratio, r) for r in reuses],
    }


def rates_from_json(path: str | Path) -> dict[str, float]:
    """``generator_rate`` and/or ``trainer_rate`` from a stablerep-bench JSON (generator, trainer or online)."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"plan: cannot read rates from {path}: {err}") from err
    results = payload.get("results", payload)
    name = payload.get("benchmark", "")
    if "paths" in results:  # generator
        paths = results["paths"]
        run = paths.get("service_pool") or paths.get("service_backend")
        if not run:
            raise ValueError(f"plan: {path}: generator results without a service path ({sorted(paths)})")
        return {"generator_rate": float(run["images_per_second"])}
    if "fed_step" in results:  # trainer
        return {"trainer_rate": float(results["fed_step"]["images_per_s"])}
    if "trainer_images_per_s" in results and "generated_images_per_s" in results:  # online
        stall, idle = results["trainer_stall_fraction"], results["generator_idle_fraction"]
        rates = {}
        if stall < 1:
            rates["trainer_rate"] = results["trainer_images_per_s"] / (1.0 - stall)
        if idle < 1:
            rates["generator_rate"] = results["generated_images_per_s"] / (results["generators"] * (1.0 - idle))
        return rates
    raise ValueError(f"plan: {path} ({name or 'unknown benchmark'}) has no generator, trainer or online rates")


def format_table(result: dict[str, Any]) -> str:
    lines = [
        (f"generator {result['generator_images_per_s']:.4g} images/s per GPU, trainer "
        f"{result['trainer_images_per_s']:.4g} images/s per GPU, reuse {result['reuse']:g}"),
        (f"generator GPUs per trainer GPU: {result['generators_per_trainer']:.3f} -> {result['generator_gpus']} "
        f"generator GPUs for {result['trainer_gpus']} trainer GPU(s)"),
        f"{'gen/trainer':>11} {'reuse':>6} {'stall':>7} {'surplus':>8} {'trainer img/s':>14}",
    ]
    for table in ("by_ratio", "by_reuse"):
        for row in result[table]:
            lines.append(f"{row['generators_per_trainer']:>11.3f} {row['reuse']:>6g} "
                         f"{row['trainer_stall_fraction']:>7.1%} {row['generator_surplus_fraction']:>8.1%} "
                         f"{row['trainer_images_per_s']:>14.4g}")
        lines.append("")
    return "\n".join(lines).rstrip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="inputs", nargs="*", default=[], metavar="JSON",
                        help="stablerep-bench generator / trainer / online JSON files to take rates from")
    parser.add_argument("--generator-rate", type=float, help="images/s of one generator GPU (overrides --from)")
    parser.add_argument("--trainer-rate", type=float, help="images/s of one unstalled trainer GPU (overrides --from)")
    parser.add_argument("--reuse", type=float, default=DEFAULT_REUSE, help="target draws per image (default: %(default)s)")
    parser.add_argument("--trainer-gpus", type=int, default=1)
    parser.add_argument("--ratios", type=float, nargs="*", help="generator GPUs per trainer GPU to tabulate")
    parser.add_argument("--reuses", type=float, nargs="*", help="reuse values to tabulate at the recommended ratio")
    parser.add_argument("--live-trainer", metavar="URL",
                        help="a running stablerep-train --metrics-port endpoint (http://HOST:PORT/metrics): its "
                             "images/s and stall ratio; with --live-generator")
    parser.add_argument("--live-generator", nargs="+", default=[], metavar="URL",
                        help="the running stablerep-generator --metrics-port endpoints that feed it: their "
                             "images per generating second and idle ratios; says which side to grow")
    parser.add_argument("--quick", action="store_true",
                        help="the H100 anchors of DESIGN.md (3.1 generated, 2542 trained images/s) unless given")


def run_from_args(args: Any) -> tuple[dict[str, Any], str, dict[str, float]]:
    rates: dict[str, float] = {}
    for path in args.inputs:
        rates.update(rates_from_json(path))
    live = None
    if args.live_trainer or args.live_generator:
        from benchmarks.live_plan import live_rates

        if not (args.live_trainer and args.live_generator):
            raise ValueError("plan: --live-trainer and --live-generator go together (the trainer's and its "
                             "generators' metrics endpoints)")
        live = live_rates(args.live_trainer, list(args.live_generator))
        rates.update(trainer_rate=live["trainer_rate"], generator_rate=live["generator_rate"])
    if args.quick:
        rates.setdefault("generator_rate", 3.1)
        rates.setdefault("trainer_rate", 2542.0)
    if args.generator_rate is not None:
        rates["generator_rate"] = args.generator_rate
    if args.trainer_rate is not None:
        rates["trainer_rate"] = args.trainer_rate
    missing = [f"--{k.replace('_', '-')}" for k in ("generator_rate", "trainer_rate") if k not in rates]
    if missing:
        raise SystemExit(f"stablerep-bench plan: no {' or '.join(missing)} (give the flag or --from a JSON with it)")
    result = plan(rates["generator_rate"], rates["trainer_rate"], args.reuse, args.ratios, args.reuses,
                  args.trainer_gpus)
    bars = {f"{row['generators_per_trainer']:.3g}": row["trainer_stall_fraction"] for row in result["by_ratio"]}
    table = format_table(result)
    if live is not None:
        from benchmarks.live_plan import advice_line, advise

        result["live"] = live
        result["advice"] = advise(live, result["generators_per_trainer"], args.trainer_gpus)
        table += "\n" + advice_line(result["advice"])
    return result, table, bars
