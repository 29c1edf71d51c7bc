"""stablerep-bench: throughput of each stage, as JSON + table + plot.

    stablerep-bench protocol  --output runs/bench     # protocol v1 vs bare pyzmq vs pickle
    stablerep-bench generator --model random:sd15   # needs a GPU for meaningful numbers
    stablerep-bench trainer   --precision bf16      # bare model step vs the fed training step
    stablerep-bench all       --output runs/bench   # the protocol run, plus every GPU goal on CUDA
    stablerep-bench demo      --output runs/demo    # the embedded default end to end (make demo)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .report import write_results


def _protocol(args: argparse.Namespace) -> None:
    from .protocol_bench import format_table, run_protocol_bench

    shape = tuple(int(s) for s in args.shape.split("x"))
    results = run_protocol_bench(shape=shape, groups=args.groups, transports=tuple(args.transports),
                                 repeats=args.repeats)
    table = format_table(results)
    bars = {f"{t}/{m}": run["gb_per_s"] for t, data in results["transports"].items()
            for m, run in data["methods"].items()}
    path = write_results(Path(args.output), args.name or "protocol", results, table, bars, unit="GB/s")
    print(table)
    print(f"wrote {path}")


def _stage(name: str, module_name: str):
    def run(args: argparse.Namespace) -> None:
        import importlib

        module = importlib.import_module(f"benchmarks.{module_name}")
        results, table, bars = module.run_from_args(args)
        path = write_results(Path(args.output), args.name or name, results, table, bars, unit="images/s")
        print(table)
        print(f"wrote {path}")

    return run


# What ``all`` runs: the transport run anywhere; the goals of benchmarks/RESULTS.md that need CUDA.
ALL_RUNS = [["protocol", "--repeats", "5"]]
ALL_CUDA_RUNS = [
    ["generator", "--model", "random:sd15", "--scheduler", "ddim", "--steps", "50", "--name", "generator-ddim50"],
    ["generator", "--model", "random:sd15", "--scheduler", "dpm++", "--steps", "20", "--name", "generator-dpmpp20"],
    ["trainer", "--precision", "bf16"],
]


def _all(args: argparse.Namespace) -> None:
    import torch

    runs = list(ALL_RUNS)
    if torch.cuda.is_available():
        runs += ALL_CUDA_RUNS
    else:
        print("no CUDA device: the generator and trainer goals need one; running the protocol benchmark only")
    parser = build_parser()
    for argv in runs:
        print(f"== stablerep-bench {' '.join(argv)}", flush=True)
        sub_args = parser.parse_args([*argv, "--output", args.output])
        sub_args.func(sub_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablerep-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    proto = sub.add_parser("protocol", help="transport throughput: protocol v1 vs bare pyzmq vs pickle")
    proto.add_argument("--shape", default="10x256x256x3", help="group shape m x H x W x 3 (default: %(default)s)")
    proto.add_argument("--groups", type=int, default=500, help="timed groups per run (default: %(default)s)")
    proto.add_argument("--repeats", type=int, default=3, help="runs per method, best kept (default: %(default)s)")
    proto.add_argument("--transports", nargs="+", default=["tcp", "ipc"], choices=["tcp", "ipc"])
    proto.set_defaults(func=_protocol)
    from . import generator_bench, trainer_bench

    gen = sub.add_parser("generator", help="generator images/s: this service vs plain diffusers, same recipe")
    generator_bench.add_arguments(gen)
    gen.set_defaults(func=_stage("generator", "generator_bench"))
    train = sub.add_parser("trainer", help="trainer images/s: step fed by the replay/online source vs bare step")
    trainer_bench.add_arguments(train)
    train.set_defaults(func=_stage("trainer", "trainer_bench"))
    sub.add_parser("demo", add_help=False,
                   help="the embedded default end to end: generator service + trainer + probes (make demo); "
                        "see `stablerep-bench demo --help`")
    every = sub.add_parser("all", help="the protocol run, plus the generator and trainer goals when CUDA is present")
    every.set_defaults(func=_all)
    for p in sub.choices.values():
        if p.prog.endswith(" demo"):
            continue
        p.add_argument("--output", default="runs/bench", help="directory for JSON, table and plot")
        if p is not every:
            p.add_argument("--name", help="file stem of the results in --output (default: the benchmark's name)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the demo parses its own flags and passes the rest to the trainer
        from .demo import run_demo

        return run_demo(argv[1:])
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
