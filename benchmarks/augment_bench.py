"""GPU augmentation alone: images/s of :class:`trainer.augment.GPUAugment` at one batch size.

    stablerep-bench augment --batch 2048            # the goal: >= 30k images/s on one H100

Random uint8 ``[batch, input_size, input_size, 3]`` on the device -> float ``[batch, 3, size, size]``,
the paper's strong recipe; ``iters`` timed calls after ``warmup`` untimed ones (synchronized).
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from trainer.augment import benchmark_augment

#: the augmentation goal of benchmarks/RESULTS.md, images/s at batch 2048 on one GPU
GOAL_IMAGES_PER_S = 30_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``stablerep-bench augment`` flags."""
    parser.add_argument("--batch", type=int, default=2048, help="images per call (default: %(default)s)")
    parser.add_argument("--size", type=int, default=224, help="output side (default: %(default)s)")
    parser.add_argument("--input-size", type=int, default=256, help="stored image side (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default: %(default)s)")
    parser.add_argument("--weak", action="store_true", help="crop + flip only (the official weak recipe)")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when present)")
    parser.add_argument("--quick", action="store_true", help="16 images, 40 -> 32 px, one timed call on the CPU (tests)")


def run_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], str, dict[str, float]]:
    """Run with parsed flags; return (results, table, bars in images/s)."""
    if args.quick:
        args.batch, args.size, args.input_size, args.iters, args.warmup, args.device = 16, 32, 40, 1, 1, "cpu"
    for name in ("batch", "size", "input_size", "iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rate = benchmark_augment(batch=args.batch, size=args.size, device=device, iters=args.iters,
                             input_size=args.input_size, strong=not args.weak, warmup=args.warmup)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "batch": args.batch, "size": args.size, "input_size": args.input_size, "strong": not args.weak,
               "iters": args.iters, "images_per_s": rate, "goal_images_per_s": GOAL_IMAGES_PER_S}
    table = (f"augment: batch {args.batch}, {args.input_size} -> {args.size} px, "
             f"{'weak' if args.weak else 'strong'}, {results['device']}\n"
             f"images/s {rate:12.1f}   (goal on one GPU: >= {GOAL_IMAGES_PER_S})")
    return results, table, {"GPUAugment": rate}
