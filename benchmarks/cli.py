"""stablerep-bench: throughput of each stage, as JSON + table + plot.

    stablerep-bench protocol --output runs/bench
"""
from __future__ import annotations

import argparse
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
    path = write_results(Path(args.output), "protocol", results, table, bars, unit="GB/s")
    print(table)
    print(f"wrote {path}")


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
    for p in sub.choices.values():
        p.add_argument("--output", default="runs/bench", help="directory for JSON, table and plot")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
