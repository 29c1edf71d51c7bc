"""stablerep-bench: throughput of each stage, as JSON + table + plot.

    stablerep-bench transport --output runs/bench     # protocol v1 vs bare pyzmq vs pickle (alias: protocol)
    stablerep-bench generator --model random:sd15   # needs a GPU for meaningful numbers
    stablerep-bench generator-sweep --steps-list 20,50 --sizes 256,512  # generator images/s vs steps and size
    stablerep-bench trainer   --precision bf16      # bare model step vs the fed training step
    stablerep-bench flops     --steps 50 --guidance 2  # FLOPs per generated / trained image, limit at a peak
    stablerep-bench buffer    --precision bf16      # replay sampling + augmentation per batch vs the step
    stablerep-bench augment   --batch 2048          # GPU augmentation alone, images/s
    stablerep-bench online    --generators 2 --generator-rate 5  # the whole system: stall, idle, reuse
    stablerep-bench drills    --rate 100              # attacks on a live service: a good client's groups/s
    stablerep-bench monitor   --subsets 384:64 0:0  # the k-NN monitor's seconds vs the demo's training, its k-NN vs every image's
    stablerep-bench plan      --from runs/bench/online.json --reuse 9  # generator GPUs per trainer GPU
    stablerep-bench all       --output runs/bench   # the protocol run, plus every GPU goal on CUDA
    stablerep-bench demo      --output runs/demo    # the embedded default end to end (make demo)
    stablerep-bench study     --output runs/study   # stablerep vs simclr vs clip, online vs offline, reuse

Exit codes: 0 completed, 1 failed, 2 bad input, 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from infra.cli_parser import SuggestingParser

from .results_writer import QUICK_NOTE, write_results


def _protocol(args: argparse.Namespace) -> None:
    from .protocol_bench import METHOD_LEGEND, format_table, run_protocol_bench

    if args.quick:
        args.shape, args.groups, args.repeats, args.transports = "2x32x32x3", 20, 1, ["ipc"]
    shape = tuple(int(s) for s in args.shape.split("x"))
    results = run_protocol_bench(shape=shape, groups=args.groups, transports=tuple(args.transports),
                                 repeats=args.repeats)
    table = format_table(results)
    bars = {f"{t}/{m}": run["gb_per_s"] for t, data in results["transports"].items()
            for m, run in data["methods"].items()}
    spread = {f"{t}/{m}": (min(run["runs_gb_per_s"]), max(run["runs_gb_per_s"]))
              for t, data in results["transports"].items() for m, run in data["methods"].items()}
    note = "bars: best run; lines: min-max over the runs\n" + "\n".join(
        f"{name}: {text}" for name, text in METHOD_LEGEND.items())
    table = _with_quick_note(args, table)
    path = write_results(Path(args.output), args.name or args.bench, results, table, bars, unit="GB/s",
                         spread=spread, note=note, xlabel="transport / method", quick=args.quick)
    print(table)
    print(f"wrote {path}")


def _with_quick_note(args: argparse.Namespace, table: str) -> str:
    """A ``--quick`` table starts with :data:`QUICK_NOTE`: its groups are too small to time anything."""
    return f"{QUICK_NOTE}\n{table}" if getattr(args, "quick", False) else table


def _generator_sweep(args: argparse.Namespace) -> None:
    from .generator_sweep import plot, run_from_args

    rows, table = run_from_args(args)
    output, name = Path(args.output), args.name or args.bench
    table = _with_quick_note(args, table)
    path = write_results(output, name, rows, table, quick=args.quick)
    print(table)
    print(f"wrote {path}")
    print(f"wrote {plot(rows, output / f'{name}.png')}")


def _stage(name: str, module_name: str, unit: str = "images/s", xlabel: str = ""):
    def run(args: argparse.Namespace) -> None:
        import importlib

        module = importlib.import_module(f"benchmarks.{module_name}")
        results, table, bars = module.run_from_args(args)
        table = _with_quick_note(args, table)
        path = write_results(Path(args.output), args.name or name, results, table, bars, unit=unit, xlabel=xlabel,
                             quick=getattr(args, "quick", False))
        print(table)
        print(f"wrote {path}")

    return run


# What ``all`` runs: the transport run anywhere; the goals of benchmarks/RESULTS.md that need CUDA.
ALL_RUNS = [["transport", "--repeats", "5"], ["flops"]]
ALL_CUDA_RUNS = [
    ["generator", "--model", "random:sd15", "--scheduler", "ddim", "--steps", "50", "--name", "generator-ddim50"],
    ["generator", "--model", "random:sd15", "--scheduler", "dpm++", "--steps", "20", "--name", "generator-dpmpp20"],
    # Fast recipes on the same random SD v1.5 weights (no hub adapter/decoder: a fused LoRA costs nothing,
    # TAESD's architecture with random weights costs what TAESD does).
    ["generator", "--model", "random:sd15", "--recipe", "lcm4", "--lora", "none", "--name", "generator-lcm4"],
    ["generator", "--model", "random:sd15", "--recipe", "turbo-tiny", "--vae", "tiny:random", "--name",
     "generator-turbo-tiny"],
    ["generator-sweep", "--model", "random:sd15", "--steps-list", "20,50", "--sizes", "256,512", "--captions", "16"],
    ["trainer", "--precision", "bf16"],
    ["buffer", "--precision", "bf16"],
]


def quick_runs() -> list[list[str]]:
    """``all --quick``: the ``--quick`` form of every stage ``all`` runs (each once), CUDA or not."""
    stages = dict.fromkeys(run[0] for run in ALL_RUNS + ALL_CUDA_RUNS)
    return [[stage, "--quick"] for stage in stages]


def _all(args: argparse.Namespace) -> None:
    import torch

    if args.quick:
        runs = quick_runs()
    elif torch.cuda.is_available():
        runs = ALL_RUNS + ALL_CUDA_RUNS
    else:
        runs = list(ALL_RUNS)
        print("no CUDA device: the generator and trainer goals need one; running the protocol and FLOP benchmarks only")
    parser = build_parser()
    for argv in runs:
        print(f"== stablerep-bench {' '.join(argv)}", flush=True)
        sub_args = parser.parse_args([*argv, "--output", args.output])
        sub_args.func(sub_args)


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(prog="stablerep-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    proto = sub.add_parser("transport", aliases=["protocol"],
                           help="transport throughput: protocol v1 vs bare pyzmq vs pickle (alias: protocol)")
    proto.add_argument("--shape", default="10x256x256x3", help="group shape m x H x W x 3 (default: %(default)s)")
    proto.add_argument("--groups", type=int, default=500, help="timed groups per run (default: %(default)s)")
    proto.add_argument("--repeats", type=int, default=3, help="runs per method, best kept (default: %(default)s)")
    proto.add_argument("--transports", nargs="+", default=["tcp", "ipc"], choices=["tcp", "ipc"],
                       help="socket transports to time (default: tcp ipc)")
    proto.add_argument("--quick", action="store_true", help="a small run over ipc (tests)")
    proto.set_defaults(func=_protocol)
    from . import (
        augment_bench,
        buffer_bench,
        drills,
        flops,
        generator_bench,
        generator_sweep,
        monitor_bench,
        offline_bench,
        online_bench,
        plan,
        trainer_bench,
    )

    gen = sub.add_parser("generator", help="generator images/s: this service vs plain diffusers, same recipe")
    generator_bench.add_arguments(gen)
    gen.set_defaults(func=_stage("generator", "generator_bench", xlabel="generation path"))
    gen_sweep = sub.add_parser("generator-sweep", help="generator images/s over a grid of steps x sizes, "
                                                       "every generator flag passed through; line plot")
    generator_sweep.add_arguments(gen_sweep)
    gen_sweep.set_defaults(func=_generator_sweep)
    train = sub.add_parser("trainer", help="trainer images/s: step fed by the replay/online source vs bare step")
    trainer_bench.add_arguments(train)
    train.set_defaults(func=_stage("trainer", "trainer_bench", xlabel="training step"))
    flop = sub.add_parser("flops", help="FLOPs per generated and per trained image, and the physical limit in images/s")
    flops.add_arguments(flop)
    flop.set_defaults(func=_stage("flops", "flops", unit="TFLOP per image", xlabel="part of the work"))
    buf = sub.add_parser("buffer", help="cost per batch of replay sampling and GPU augmentation vs the train step")
    buffer_bench.add_arguments(buf)
    buf.set_defaults(func=_stage("buffer", "buffer_bench", xlabel="stage of one batch"))
    aug = sub.add_parser("augment", help="GPU augmentation alone: images/s at one batch size")
    augment_bench.add_arguments(aug)
    aug.set_defaults(func=_stage("augment", "augment_bench", xlabel="GPU augmentation"))
    online = sub.add_parser("online", help="generator services + trainer in one run: stall, idle, reuse, eviction")
    online_bench.add_arguments(online)
    online.set_defaults(func=_stage("online", "online_bench", xlabel="images/s trained vs generated"))
    offline = sub.add_parser("offline", help="offline source start-up and index memory at 2k/100k/1M groups; groups/s "
                                             "per worker from disk and a local S3 server vs plain webdataset")
    offline_bench.add_arguments(offline)
    offline.set_defaults(func=_stage("offline", "offline_bench", unit="groups/s", xlabel="reader and store"))
    drill = sub.add_parser("drills", help="a good client's groups/s before, during and after each attack on a service")
    drills.add_arguments(drill)
    drill.set_defaults(func=_stage("drills", "drills", unit="good client groups/s during the attack", xlabel="attack"))
    mon = sub.add_parser("monitor", help="the k-NN monitor's seconds per evaluation vs the demo's training seconds "
                                         "between evaluations, in the same run, and its k-NN against every probe image's")
    monitor_bench.add_arguments(mon)
    mon.set_defaults(func=_stage("monitor", "monitor_bench", unit="% of the demo's training at every 250 steps",
                                 xlabel="monitor subset (train:val images per probe)"))
    planner = sub.add_parser("plan", help="generator GPUs per trainer GPU for a target reuse; stall at other ratios")
    plan.add_arguments(planner)
    planner.set_defaults(func=_stage("plan", "plan", unit="trainer stall fraction",
                                     xlabel="generator GPUs per trainer GPU"))
    sub.add_parser("demo", add_help=False,
                   help="the embedded default end to end: generator service + trainer + probes (make demo); "
                        "--quick is the 1-minute version, --steps N a longer one; see `stablerep-bench demo --help`")
    sub.add_parser("study", add_help=False,
                   help="the paper's comparisons in miniature on the embedded default (method, online vs offline, "
                        "reuse); --quick is the short version; see `stablerep-bench study --help`")
    every = sub.add_parser("all", help="the protocol run, plus the generator and trainer goals when CUDA is present")
    every.add_argument("--quick", action="store_true", help="the --quick form of every stage it runs (tests the code paths)")
    every.set_defaults(func=_all)
    for p in {id(p): p for p in sub.choices.values()}.values():  # aliases share a parser
        if p.prog.endswith((" demo", " study")):
            continue
        p.add_argument("--output", default="runs/bench", help="directory for JSON, table and plot")
        if p is not every:
            p.add_argument("--name", help="file stem of the results in --output (default: the benchmark's name)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the demo parses its own flags and passes the rest to the trainer
        from experiments.demo import run_demo

        return run_demo(argv[1:])
    if argv[:1] == ["study"]:  # so does the study
        from experiments.study import run_study

        return run_study(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("stablerep-bench: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as exc:
        print(f"stablerep-bench: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:
        print(f"stablerep-bench: failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
