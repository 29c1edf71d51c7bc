"""``stablerep-generator keys DIR`` and ``stablerep-generator probe-set``: the tools beside a run.

(``stablerep-generator captions`` lives with the grammar it writes: `generator_service.procedural.cli`.)
"""
from __future__ import annotations

import json

from generator_service.cli_arguments import PROG
from infra.cli_parser import SuggestingParser


def keys_main(argv: list[str]) -> int:
    """``stablerep-generator keys DIR``: a fresh CurveZMQ key directory for --curve-keys."""
    from protocol.curve import write_keys

    parser = SuggestingParser(prog=f"{PROG} keys", description=(
        "Make a CurveZMQ key directory: the service's key pair, one trainer key pair, and authorized/ "
        "holding that trainer's public key, and DIR/trainer with only what trainers need. Pass --curve-keys DIR "
        "to stablerep-generator and --curve-keys DIR/trainer to stablerep-train. Existing keys are never overwritten."))
    parser.add_argument("directory", metavar="DIR")
    args = parser.parse_args(argv)
    root = write_keys(args.directory)
    print(f"{PROG}: keys written to {root} (secret keys mode 0600); "
          f"serve with --curve-keys {root}, train with --curve-keys {root / 'trainer'} (it holds no service secret)")
    return 0


def probe_set_main(argv: list[str]) -> int:
    from generator_service.procedural.grammar import attributes
    from generator_service.procedural.probe_set import write_probe_imagefolder

    parser = SuggestingParser(prog=f"{PROG} probe-set", description="Write a procedural ImageFolder (train/, val/) for linear probes.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--attribute", default="shape", choices=list(attributes), help="the attribute that is the class")
    parser.add_argument("--train-per-class", type=int, default=50)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = write_probe_imagefolder(
        args.out,
        attribute=args.attribute,
        images_per_class_train=args.train_per_class,
        images_per_class_val=args.val_per_class,
        size=args.size,
        seed=args.seed,
    )
    print(json.dumps(summary))
    return 0
