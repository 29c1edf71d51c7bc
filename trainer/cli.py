"""``stablerep-train``: train a ViT with StableRep (or SimCLR / CLIP / StableRep+) on caption groups.

Two-stage parse: ``--preset NAME`` / ``--config FILE`` pick the defaults first, then every flag
given on the command line overrides them (flags not given leave the preset's value alone).

    stablerep-train --preset cpu_small --generators tcp://127.0.0.1:5555 --output runs/try
    stablerep-train --preset paper_vitb16_cc12m_1x --generators tcp://gen0:5555 tcp://gen1:5555
    stablerep-train --preset cpu_small --source offline --data shards/ --steps 100
    accelerate launch --num_processes 8 -m trainer.cli --preset paper_vitb16_cc12m_1x ...
    stablerep-train --preset demo --generators tcp://127.0.0.1:5555   # the demo's trainer settings
    (the embedded default end to end, generator and probes included, is ``stablerep-bench demo``)

Exit codes: 0 done; 1 training failed (non-finite loss, no generator, data error); 2 bad
command line or config.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from trainer.config import ConfigError, TrainConfig, available_presets, build_config

S = argparse.SUPPRESS


def _key_values(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as YAML (``depth=2`` -> ("depth", 2))."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), yaml.safe_load(value)


# (group title, flags, config path, argparse keyword arguments)
_FLAGS: list[tuple[str, tuple[str, ...], str, dict[str, Any]]] = [
    ("model", ("--model",), "model.name", dict(metavar="TIMM_NAME", help="timm backbone name")),
    ("model", ("--model-kwargs",), "model.model_kwargs",
     dict(nargs="+", type=_key_values, metavar="KEY=VALUE", help="extra timm.create_model arguments, e.g. patch_size=8 depth=6")),
    ("model", ("--img-size",), "model.img_size", dict(type=int, help="training resolution (crop side)")),
    ("model", ("--head-hidden",), "model.head_hidden", dict(type=int, help="projection head hidden width")),
    ("model", ("--head-out",), "model.head_out", dict(type=int, help="projection head output (feature) width")),
    ("model", ("--head-layers",), "model.head_layers", dict(type=int, help="projection head Linear layers")),
    ("model", ("--sync-bn",), "model.sync_bn", dict(action="store_const", const=True, help="SyncBatchNorm across processes")),
    ("model", ("--text-kwargs",), "model.text", dict(nargs="+", type=_key_values, metavar="KEY=VALUE", help="text tower size for clip / stablerep+, e.g. layers=4 width=256")),
    ("method", ("--method",), "method.name", dict(choices=["stablerep", "stablerep+", "simclr", "clip"])),
    ("method", ("--temperature",), "method.temperature", dict(type=float, help="contrastive temperature T")),
    ("method", ("--method-kwargs",), "method.kwargs", dict(nargs="+", type=_key_values, metavar="KEY=VALUE", help="extra build_method arguments")),
    ("augmentation", ("--weak-aug",), "augment.strong", dict(action="store_const", const=False, help="crop + flip only (no color jitter, grayscale, blur)")),
    ("augmentation", ("--strong-aug",), "augment.strong", dict(action="store_const", const=True, help="the paper's strong augmentation")),
    ("augmentation", ("--scale-min",), "augment.scale_min", dict(type=float, help="RandomResizedCrop lower scale")),
    ("augmentation", ("--blur-p",), "augment.blur_p", dict(type=float, help="probability of the Gaussian blur (strong recipe)")),
    ("augmentation", ("--downsample",), "augment.downsample", dict(type=int, metavar="SIDE", help="shrink images to SIDE before augmenting")),
    ("data", ("--source",), "data.source", dict(choices=["online", "offline"])),
    ("data", ("--generators",), "data.generators", dict(nargs="+", metavar="ENDPOINT", help="online: generator endpoints tcp://HOST:PORT")),
    ("data", ("--data",), "data.data", dict(nargs="+", metavar="DIR", help="offline: shard directories")),
    ("data", ("--captions-per-step", "--batch-captions"), "data.captions_per_step", dict(type=int, help="captions per optimizer step over all processes (each rank takes captions-per-step / world size); --batch-captions is a deprecated alias")),
    ("data", ("--draw-per-caption", "--images-per-caption"), "data.draw_per_caption", dict(type=int, help="images drawn from each caption group per step (n; the official n_img); --images-per-caption is a deprecated alias")),
    ("data", ("--image-size",), "data.image_size", dict(type=int, help="stored image side: online replay buffer, offline decode (default: the generator's save size)")),
    ("data", ("--connect-timeout",), "data.connect_timeout", dict(type=float, metavar="SECONDS")),
    ("data", ("--sample-timeout",), "data.sample_timeout", dict(type=float, metavar="SECONDS")),
    ("data", ("--credits",), "data.credits", dict(type=int, help="online: groups in flight per generator")),
    ("data", ("--num-workers",), "data.num_workers", dict(type=int, help="offline: decoding workers")),
    ("data", ("--dataset-captions",), "data.dataset_captions", dict(type=int, help="captions per epoch (for --epochs)")),
    ("replay", ("--replay-capacity",), "replay.capacity_groups", dict(type=int, metavar="GROUPS", help="buffer slots (default: 8 batches' worth)")),
    ("replay", ("--replay-gib",), "replay.capacity_gib", dict(type=float, metavar="GIB", help="buffer size in GiB instead of groups")),
    ("replay", ("--replay-storage",), "replay.storage", dict(choices=["auto", "gpu", "host"], help="auto: GPU memory when the buffer takes <= 1/4 of the free GPU memory, else pinned host memory")),
    ("replay", ("--replay-evict",), "replay.evict", dict(choices=["fifo", "most-used"], help="which group leaves a full buffer first")),
    ("replay", ("--max-reuse",), "replay.max_reuse", dict(type=int, help="draws after which a group retires")),
    ("replay", ("--min-fresh",), "replay.min_fresh", dict(type=float, help="fraction of never-drawn groups per batch")),
    ("replay", ("--hard-negatives",), "replay.hard_fraction", dict(type=float, metavar="FRACTION", help="fraction of batches made of caption cells: an anchor caption and captions differing from it in one word (default 0)")),
    ("replay", ("--cell-size",), "replay.cell_size", dict(type=int, help="captions per caption cell of --hard-negatives batches")),
    ("optimizer", ("--lr",), "optim.lr", dict(type=float, help="peak lr (default: base lr x images per step / 256)")),
    ("optimizer", ("--base-lr",), "optim.base_lr", dict(type=float, help="lr per 256 images")),
    ("optimizer", ("--betas",), "optim.betas", dict(nargs=2, type=float, metavar=("B1", "B2"))),
    ("optimizer", ("--eps",), "optim.eps", dict(type=float)),
    ("optimizer", ("--weight-decay", "--wd"), "optim.weight_decay", dict(type=float)),
    ("optimizer", ("--grad-clip",), "optim.grad_clip", dict(type=float, metavar="MAX_NORM")),
    ("schedule", ("--steps",), "schedule.steps", dict(type=int, help="optimizer steps of the whole run")),
    ("schedule", ("--epochs",), "schedule.epochs", dict(type=float, help="run length in epochs of --dataset-captions")),
    ("schedule", ("--warmup-steps",), "schedule.warmup_steps", dict(type=int)),
    ("schedule", ("--warmup-epochs",), "schedule.warmup_epochs", dict(type=float)),
    ("schedule", ("--min-lr",), "schedule.min_lr", dict(type=float)),
    ("run", ("--output", "-o"), "run.output", dict(metavar="DIR", help="run directory")),
    ("run", ("--precision",), "run.precision", dict(choices=["bf16", "fp16", "no"])),
    ("run", ("--seed",), "run.seed", dict(type=int)),
    ("run", ("--save-every",), "run.save_every", dict(type=int, metavar="STEPS")),
    ("run", ("--resume",), "run.resume", dict(metavar="PATH|auto", help="checkpoint dir, or auto = OUTPUT/checkpoints/last")),
    ("run", ("--compile",), "run.compile", dict(action="store_const", const=True, help="torch.compile the model")),
    ("run", ("--log-every",), "run.log_every", dict(type=int, metavar="STEPS")),
    ("run", ("--log-with",), "run.log_with", dict(nargs="*", choices=["tensorboard", "wandb"])),
    ("run", ("--no-progress",), "run.progress", dict(action="store_const", const=False, help="no progress bar")),
    ("run", ("--cpu",), "run.cpu", dict(action="store_const", const=True, help="train on the CPU even with a GPU present")),
]


def _default_of(path: str) -> Any:
    group, name = path.split(".")
    return getattr(getattr(TrainConfig(), group), name)


def _preset_parser(add_help: bool) -> tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    parser = argparse.ArgumentParser(
        prog="stablerep-train", add_help=add_help, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("preset and config")
    group.add_argument("--preset", metavar="NAME",
                       help=f"defaults from trainer/presets/NAME.yaml ({', '.join(available_presets())})")
    group.add_argument("--config", metavar="FILE", help="YAML config (e.g. a run's config.yaml); overrides the preset")
    return parser, group


def build_parser() -> argparse.ArgumentParser:
    parser, preset_group = _preset_parser(add_help=True)
    parser.epilog = "Exit codes: 0 done, 1 training failed, 2 bad command line or config."
    preset_group.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for title, flags, path, kwargs in _FLAGS:
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        kwargs = dict(kwargs)
        if kwargs.get("action") != "store_const" and "choices" not in kwargs:
            kwargs.setdefault("metavar", flags[0].lstrip("-").upper().replace("-", "_"))
        if kwargs.get("action") != "store_const":
            kwargs["help"] = f"{kwargs.get('help', '')} [{path}, default {_default_of(path)!r}]".strip()
        else:
            kwargs["help"] = f"{kwargs['help']} [{path}]"
        groups[title].add_argument(*flags, dest=path, default=S, **kwargs)
    return parser


def overrides_from_args(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Flags actually given -> nested ``{group: {field: value}}``."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in vars(ns).items():
        if "." not in key:
            continue
        group, name = key.split(".", 1)
        if name in ("model_kwargs", "kwargs", "text"):
            value = dict(value)
        out.setdefault(group, {})[name] = value
    return out


def parse_config(argv: Sequence[str]) -> tuple[TrainConfig, argparse.Namespace]:
    """argv -> validated config (raises ``ConfigError``; argparse exits with 2 on bad flags)."""
    ns = build_parser().parse_args(list(argv))
    cfg = build_config(preset=ns.preset, config_file=ns.config, overrides=overrides_from_args(ns))
    return cfg, ns


#: Old flag -> its name now; the old ones still work and print a warning.
DEPRECATED_FLAGS = {"--batch-captions": "--captions-per-step", "--images-per-caption": "--draw-per-caption"}


def warn_deprecated_flags(argv: Sequence[str]) -> None:
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name in DEPRECATED_FLAGS:
            print(f"stablerep-train: warning: {name} is deprecated; use {DEPRECATED_FLAGS[name]}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warn_deprecated_flags(argv)
    try:
        cfg, ns = parse_config(argv)
    except ConfigError as exc:
        print(f"stablerep-train: error: {exc}", file=sys.stderr)
        return 2
    if ns.print_config:
        print(yaml.safe_dump(cfg.resolved_dict(), sort_keys=False), end="")
        return 0

    from trainer.loop import NonFiniteLossError, train
    from trainer.sources.online import GroupStreamError

    try:
        summary = train(cfg)
    except ConfigError as exc:
        print(f"stablerep-train: error: {exc}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, GroupStreamError, ConnectionError, TimeoutError, FileNotFoundError,
            ValueError) as exc:
        print(f"stablerep-train: training failed: {exc}", file=sys.stderr)
        return 1
    summary_path = Path(cfg.run.output) / "train_summary.json"
    if not _is_main_process():
        return 0
    summary_path.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    last = summary["losses"][-1] if summary["losses"] else float("nan")
    print(
        f"stablerep-train: {summary['stopped']} at step {summary['steps']}/{summary['total_steps']}, "
        f"loss {last:.4f}, {summary['images_per_s']:.1f} images/s; checkpoint {summary['checkpoint']}"
    )
    return 0


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


if __name__ == "__main__":
    sys.exit(main())
