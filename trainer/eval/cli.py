"""``stablerep-eval``: linear probe, weighted k-NN and few-shot evaluation of a frozen backbone.

    stablerep-eval linear --checkpoint runs/demo --train DATA/train --val DATA/val [--protocol fast|paper]
    stablerep-eval knn --checkpoint runs/demo --train DATA/train --val DATA/val [--knn-k 20 --knn-temperature 0.07]
    stablerep-eval fewshot --checkpoint runs/demo --data DATA/val [--n-way 5 --k-shot 5]

Exit codes: 0 completed, 1 evaluation failed, 2 bad input, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from infra.cli_parser import SuggestingParser
from trainer.eval.backbones import BackboneSpecError, load_eval_backbone
from trainer.eval.features import resolve_device
from trainer.eval.fewshot import FewShotConfig
from trainer.eval.imagefolder import ImageFolderError
from trainer.eval.knn import KnnConfig
from trainer.eval.linear import FastProbeConfig, PaperProbeConfig
from trainer.eval.probe import fewshot_probe, knn_probe, linear_probe
from trainer.interrupts import EXIT_INTERRUPTED, Progress, StopSignals
from trainer.kwargs_arg import add_kwargs_argument, merge_kwargs


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def default_workers() -> int:
    """min(4, the CPU cores this process may use): torch warns about more workers than cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def _add_common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backbone")
    group.add_argument("--checkpoint", required=True,
                       help="run dir, backbone.json/.safetensors, timm:NAME (random init) or timm-pretrained:NAME")
    add_kwargs_argument(group, "--model-kwargs", default=None,
                        help="timm.create_model arguments for timm:/random: specs, e.g. img_size=64 patch_size=8")
    group.add_argument("--init-seed", type=int, default=0, help="seed of a random-init backbone")
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    run.add_argument("--batch-size", type=int, default=256, help="images per feature-extraction batch (default: %(default)s)")
    run.add_argument("--workers", type=int, default=default_workers(),
                     help="DataLoader workers for image decoding (default: min(4, usable CPU cores) = %(default)s)")
    run.add_argument("--cache-dir", default=None, help="store extracted features here and reuse them")
    run.add_argument("--output", default=None, help="write the result JSON to this file")


def _add_train_val(parser: argparse.ArgumentParser, train_help: str, val_help: str) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--train", required=True, help=train_help)
    data.add_argument("--val", required=True, help=val_help)


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(prog="stablerep-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    lin = sub.add_parser("linear", help="linear probe on a frozen backbone")
    _add_common(lin)
    _add_train_val(lin, "ImageFolder for training the probe", "ImageFolder for scoring it")
    probe = lin.add_argument_group("probe")
    probe.add_argument("--protocol", choices=("fast", "paper"), default="fast", help="fast: the quick probe; paper: the paper's linear protocol (default: %(default)s)")
    probe.add_argument("--epochs", type=int, default=None, help="default: fast 100, paper 90")
    probe.add_argument("--lrs", type=_floats, default=None,
                       help="fast: lrs of the grid; paper: base lrs (lr = base * batch / 256)")
    probe.add_argument("--weight-decays", type=_floats, default=None, help="fast: weight decays of the grid")
    probe.add_argument("--select", choices=("holdout", "val"), default="holdout",
                       help="fast: pick the grid point on a held-out part of train (default) or on val")
    probe.add_argument("--no-batch-norm", action="store_true", help="paper: no BatchNorm1d before the classifier (the default)")
    probe.add_argument("--batch-norm", action="store_true", help="paper: BatchNorm1d(affine=False) before the classifier")
    probe.add_argument("--probe-batch-size", type=int, default=None, help="paper: SGD batch (default 1024, official)")
    probe.add_argument("--momentum", type=float, default=None, help="paper: SGD momentum (default 0.9)")
    probe.add_argument("--weight-decay", type=float, default=None, help="paper: SGD weight decay (default 0)")
    probe.add_argument("--no-standardize", action="store_true", help="fast: do not standardize cached features")
    probe.add_argument("--eval-every", type=int, default=None,
                       help="paper: evaluate val every N epochs, best over evaluations (default 10; 0 = end only)")
    probe.add_argument("--seed", type=int, default=0, help="seed of the probe training (default: %(default)s)")

    knn = sub.add_parser("knn", help="weighted k-NN (cosine, exp(sim / T) votes) on a frozen backbone")
    _add_common(knn)
    _add_train_val(knn, "ImageFolder whose features are the neighbours", "ImageFolder whose images are classified")
    vote = knn.add_argument_group("k-NN")
    vote.add_argument("--knn-k", type=int, default=KnnConfig.k, help="neighbours per query (default: %(default)s, DINO)")
    vote.add_argument("--knn-temperature", type=float, default=KnnConfig.temperature,
                      help="vote weight exp(cosine / T) (default: %(default)s, DINO)")

    few = sub.add_parser("fewshot", help="N-way K-shot episodes with logistic regression")
    _add_common(few)
    few.add_argument("--data", required=True, help="ImageFolder whose classes the episodes draw from")
    few.add_argument("--n-way", type=int, default=5, help="classes per episode (default: %(default)s)")
    few.add_argument("--k-shot", type=int, default=5, help="labelled images per class (default: %(default)s)")
    few.add_argument("--n-query", type=int, default=15, help="query images per class (default: %(default)s)")
    few.add_argument("--episodes", type=int, default=600, help="episodes averaged (default: %(default)s)")
    few.add_argument("--inverse-reg", type=float, default=1.0, help="C of the L2-regularized logistic regression")
    few.add_argument("--seed", type=int, default=0, help="seed of the episode sampling (default: %(default)s)")
    return parser


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A rich table when stdout is a terminal-capable console, plain text otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dependency
        print(title)
        print("  ".join(columns))
        for row in rows:
            print("  ".join(_fmt(v) for v in row))
        return
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row))
    Console(width=120).print(table)


def _linear(args: argparse.Namespace, backbone, device, progress: Progress) -> dict[str, Any]:
    if args.protocol == "fast":
        given = {"epochs": args.epochs, "lrs": args.lrs, "weight_decays": args.weight_decays}
        cfg = FastProbeConfig(select=args.select, standardize=not args.no_standardize, seed=args.seed,
                              batch_size=max(args.batch_size, 1024),
                              **{k: v for k, v in given.items() if v is not None})
    else:
        given = {"epochs": args.epochs, "base_lrs": args.lrs, "batch_size": args.probe_batch_size,
                 "eval_every": args.eval_every, "momentum": args.momentum, "weight_decay": args.weight_decay}
        cfg = PaperProbeConfig(batch_norm=args.batch_norm and not args.no_batch_norm, seed=args.seed,
                               workers=args.workers, **{k: v for k, v in given.items() if v is not None})
    result = linear_probe(backbone, args.train, args.val, cfg, device, args.batch_size, args.workers, args.cache_dir,
                          progress=progress)
    if args.protocol == "fast":
        rows = [[f"{r['lr']:g}", f"{r['weight_decay']:g}", r.get("holdout_top1"), r["train_top1"], r["top1"], r["top5"]]
                for r in result["grid"]]
        print_table(f"linear probe (fast), {result['num_classes']} classes", ["lr", "wd", "holdout top1",
                    "train top1", "val top1", "val top5"], rows)
        sel = result["selected"]
        print(f"selected lr={sel['lr']} wd={sel['weight_decay']} on {sel['selected_on']}: "
              f"top1 {result['top1']:.2f}%" + (f", top5 {result['top5']:.2f}%" if result["top5"] is not None else ""))
    else:
        rows = [[f"{r['base_lr']:g}", f"{r['lr']:g}", f"{r['final_train_loss']:.4f}", r["top1"], r["best_epoch"],
                 r["top5"]] for r in result["per_lr"]]
        print_table(f"linear probe (paper, {result['config']['epochs']} epochs), {result['num_classes']} classes",
                    ["base lr", "lr", "train loss", "best val top1", "at epoch", "val top5"], rows)
        sel = result["selected"]
        print(f"best base lr {sel['base_lr']:g} (lr {sel['lr']:g}) at epoch {sel['epoch']}: top1 {result['top1']:.2f}%"
              + (f", top5 {result['top5']:.2f}%" if result["top5"] is not None else "")
              + f" (last epoch: top1 {result['final_top1']:.2f}%)")
    if result["skipped_images"]:
        print(f"skipped {result['skipped_images']} unreadable images (listed in the JSON)")
    return result


def _knn(args: argparse.Namespace, backbone, device, progress: Progress) -> dict[str, Any]:
    cfg = KnnConfig(k=args.knn_k, temperature=args.knn_temperature)
    progress.enter("features", "training and held-out images, then k-NN")
    result = knn_probe(backbone, args.train, args.val, cfg, device, args.batch_size, args.workers, args.cache_dir)
    print(f"k-NN (k={cfg.k}, T={cfg.temperature:g}), {result['num_classes']} classes, "
          f"{result['train_images']} neighbours, {result['val_images']} queries: top1 {result['top1']:.2f}%"
          + (f", top5 {result['top5']:.2f}%" if result["top5"] is not None else ""))
    if result["skipped_images"]:
        print(f"skipped {result['skipped_images']} unreadable images (listed in the JSON)")
    return result


def _fewshot(args: argparse.Namespace, backbone, device, progress: Progress) -> dict[str, Any]:
    cfg = FewShotConfig(n_way=args.n_way, k_shot=args.k_shot, n_query=args.n_query, episodes=args.episodes,
                        seed=args.seed, inverse_reg=args.inverse_reg)
    result = fewshot_probe(backbone, args.data, cfg, device, args.batch_size, args.workers, args.cache_dir,
                           progress=progress)
    print(f"{cfg.n_way}-way {cfg.k_shot}-shot over {cfg.episodes} episodes: "
          f"{result['accuracy']:.2f}% +- {result['ci95']:.2f} (95% CI)")
    if result["excluded_classes"]:
        print(f"excluded classes with < {cfg.k_shot + cfg.n_query} images: {result['excluded_classes']}")
    if result["skipped_images"]:
        print(f"skipped {result['skipped_images']} unreadable images (listed in the JSON)")
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = Progress("setup", "loading the backbone")
    with StopSignals() as stop:
        try:
            for folder in ([args.data] if args.command == "fewshot" else [args.train, args.val]):
                if not Path(folder).is_dir():
                    raise ImageFolderError(f"image folder {folder} does not exist or is not a directory")
            if args.command == "knn":
                KnnConfig(k=args.knn_k, temperature=args.knn_temperature)  # bad settings before loading anything
            backbone = load_eval_backbone(args.checkpoint, merge_kwargs(args.model_kwargs), seed=args.init_seed)
            device = resolve_device(args.device)
            run = {"linear": _linear, "knn": _knn, "fewshot": _fewshot}[args.command]
            result = run(args, backbone, device, progress)
        except (BackboneSpecError, ImageFolderError, ValueError, FloatingPointError) as err:
            print(f"stablerep-eval: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            kept = ""
            if args.output:
                _write_json(Path(args.output), {"interrupted": True, "stopped_at": {
                    **progress.as_dict(), "signal": stop.describe()}, "command": args.command})
                kept = f"; wrote {args.output} marked interrupted"
            cached = f"; features extracted so far stay in {args.cache_dir}" if args.cache_dir else ""
            print(f"stablerep-eval: interrupted by {stop.describe()} in {progress.where()}{kept}{cached}",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
        except (RuntimeError, OSError) as err:
            print(f"stablerep-eval: evaluation failed: {err}", file=sys.stderr)
            return 1
    if args.output:
        _write_json(Path(args.output), result)
        print(f"wrote {args.output}")
    return 0


def _write_json(out: Path, payload: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(out)


if __name__ == "__main__":
    sys.exit(main())
