"""Trainer stall against generators per trainer and against max reuse, from ``online`` runs, with the plan check.

    python -m benchmarks.online_sweep --output benchmarks/results --reuse 9

1. an ``online`` run with unlimited reuse and one generator throttled to ``probe_rate`` groups/s
   measures the trainer's unstalled rate ``T`` = trainer images/s / (1 - stall). Unlimited reuse
   means the trainer never waits for supply, and the low throttle keeps the generator off the CPU
   the trainer needs (an unthrottled procedural generator takes a whole core, which on a 2-core
   machine makes ``T`` about 10x too low and every later run supply-bound);
2. the per-generator throttle ``R`` (groups/s) is chosen so that ``plan`` asks for
   ``target_ratio`` generators (fractional, e.g. 2.5 -> it recommends 3): ``R = T / (r m target)``;
3. ``online`` at 1..``max_generators`` generators with ``max_reuse = r``: stall vs ratio;
4. ``online`` at the recommended count with ``max_reuse`` in ``reuses``: stall vs reuse.

Writes ``online-sweep.json`` and two PNG plots (measured and planned stall), and says whether the run
at the recommended ratio meets the CPU goal (stall < 5%, idle < 5%).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.online_bench import run_online_bench
from benchmarks.plan import plan, stall_fraction
from infra.machine_facts import machine_facts

GOAL = 0.05


def sweep(reuse: int = 9, target_ratio: float = 2.5, max_generators: int = 4,
          reuses: tuple[int, ...] = (1, 2, 4, 9, 16), steps: int = 200, warmup: int = 20,
          images_per_group: int = 2, probe_rate: float = 4.0, log=print) -> dict[str, Any]:
    common = {"images_per_group": images_per_group, "draw_per_caption": images_per_group, "steps": steps,
              "warmup": warmup}
    base = run_online_bench(generators=1, generator_rate=probe_rate, max_reuse=None, **common)
    trainer_rate = base["trainer_images_per_s"] / (1 - base["trainer_stall_fraction"])
    rate = trainer_rate / (reuse * images_per_group * target_ratio)
    planned = plan(rate * images_per_group, trainer_rate, reuse)
    log(f"T = {trainer_rate:.1f} images/s; throttle {rate:.3f} groups/s per generator; plan: "
        f"{planned['generators_per_trainer']:.2f} -> {planned['generator_gpus']} generators")
    by_ratio = []
    for n in range(1, max_generators + 1):
        run = run_online_bench(generators=n, generator_rate=rate, max_reuse=reuse, **common)
        by_ratio.append(run)
        log(f"  {n} generators, max reuse {reuse}: stall {run['trainer_stall_fraction']:.1%}, "
            f"idle {run['generator_idle_fraction']:.1%}, reuse {run['mean_reuse']:.2f}")
    recommended = planned["generator_gpus"]
    by_reuse = []
    for r in reuses:
        same = [run for run in by_ratio if run["generators"] == recommended and r == reuse]
        run = same[0] if same else run_online_bench(generators=recommended, generator_rate=rate, max_reuse=r, **common)
        by_reuse.append(run)
        log(f"  {recommended} generators, max reuse {r}: stall {run['trainer_stall_fraction']:.1%}, "
            f"evicted unused {run['evicted_unused_fraction']:.1%}")
    at_plan = next(run for run in by_ratio if run["generators"] == recommended) if recommended <= max_generators else None
    return {
        "reuse": reuse, "target_ratio": target_ratio, "probe_rate_groups_per_s": probe_rate, "trainer_probe": base, "trainer_rate": trainer_rate,
        "generator_rate_groups_per_s": rate, "plan": planned, "by_ratio": by_ratio, "by_reuse": by_reuse,
        "goal": {"ratio": recommended,
                 "trainer_stall_fraction": at_plan["trainer_stall_fraction"] if at_plan else None,
                 "generator_idle_fraction": at_plan["generator_idle_fraction"] if at_plan else None,
                 "met": bool(at_plan and at_plan["trainer_stall_fraction"] < GOAL
                             and at_plan["generator_idle_fraction"] < GOAL)},
    }


def plot(result: dict[str, Any], output: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g, t, r = result["generator_rate_groups_per_s"], result["trainer_rate"], result["reuse"]
    m = result["trainer_probe"]["images_per_group"]
    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ks = [run["generators"] for run in result["by_ratio"]]
    ax.plot(ks, [run["trainer_stall_fraction"] for run in result["by_ratio"]], "o-", label="measured")
    ax.plot(ks, [stall_fraction(k, g * m, t, r) for k in ks], "--", label="plan")
    ax.axvline(result["plan"]["generators_per_trainer"], color="grey", lw=0.8)
    ax.set_xlabel("generators per trainer")
    ax.set_ylabel("trainer stall fraction")
    ax.set_title(f"stall vs ratio (max reuse {r}, CPU, throttled)")
    ax.legend()
    fig.tight_layout()
    paths.append(output / "online-stall-vs-generators.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    k = result["goal"]["ratio"]
    rs = [run["max_reuse"] for run in result["by_reuse"]]
    ax.plot(rs, [run["trainer_stall_fraction"] for run in result["by_reuse"]], "o-", label="measured stall")
    ax.plot(rs, [stall_fraction(k, g * m, t, x) for x in rs], "--", label="plan stall")
    ax.plot(rs, [run["evicted_unused_fraction"] for run in result["by_reuse"]], "s:", label="evicted unused")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("max reuse (draws per group)")
    ax.set_ylabel("fraction")
    ax.set_title(f"stall vs max reuse ({k} generators)")
    ax.legend()
    fig.tight_layout()
    paths.append(output / "online-stall-vs-reuse.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/bench")
    parser.add_argument("--reuse", type=int, default=9)
    parser.add_argument("--target-ratio", type=float, default=2.5)
    parser.add_argument("--max-generators", type=int, default=4)
    parser.add_argument("--reuses", type=int, nargs="+", default=[1, 2, 4, 9, 16])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--probe-rate", type=float, default=4.0,
                        help="groups/s of the one generator while the trainer rate T is measured (unlimited reuse)")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    result = sweep(args.reuse, args.target_ratio, args.max_generators, tuple(args.reuses), args.steps, args.warmup,
                   probe_rate=args.probe_rate)
    (output / "online-sweep.json").write_text(json.dumps({"machine": machine_facts(), "results": result}, indent=2))
    for path in plot(result, output):
        print(f"wrote {path}")
    goal = result["goal"]
    print(f"at the planned ratio ({goal['ratio']} generators): stall {goal['trainer_stall_fraction']}, "
          f"idle {goal['generator_idle_fraction']}: goal {'met' if goal['met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
