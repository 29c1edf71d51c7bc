"""``stablerep-generator captions --n N --out FILE [--seed S]``: write procedural captions."""

from __future__ import annotations

import argparse

from generator_service.procedural.grammar import TEMPLATE, write_caption_file
from infra.cli_parser import SuggestingParser


def build_parser(prog: str = "stablerep-generator captions") -> argparse.ArgumentParser:
    parser = SuggestingParser(
        prog=prog,
        description=f"Write N captions of the procedural grammar ({TEMPLATE!r}) to a .txt or .csv file.",
    )
    parser.add_argument("--n", type=int, required=True, help="number of captions (576 distinct; more repeat)")
    parser.add_argument("--out", required=True, help="output file, .txt (one caption per line) or .csv")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    return parser


def main_captions(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 on success, 2 on bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    try:
        path = write_caption_file(args.out, args.n, args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"wrote {args.n} captions to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_captions())
