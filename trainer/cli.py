"""``stablerep-train``: train a ViT with StableRep (or SimCLR / CLIP / StableRep+) on caption groups.

Two-stage parse: ``--preset NAME`` / ``--config FILE`` pick the defaults first, then every flag
given on the command line overrides them (flags not given leave the preset's value alone).

    stablerep-train --preset cpu_small --generators tcp://127.0.0.1:5555 --output runs/try
    stablerep-train --preset paper_vitb16_cc12m_1x --generators tcp://gen0:5555 tcp://gen1:5555
    stablerep-train --preset cpu_small --source offline --data shards/ --steps 100
    accelerate launch --num_processes 8 -m trainer.cli --preset paper_vitb16_cc12m_1x ...
    stablerep-train --preset demo --generators tcp://127.0.0.1:5555   # the demo preset (the demo adds the grammar's --cell-words)
    (the embedded default end to end, generator and probes included, is ``stablerep-bench demo``)

Runs are never overwritten: an ``--output`` that holds a run is refused unless ``--resume auto|PATH``
(continue it; the checkpoint must match this config) or ``--overwrite`` (replace it) is given.

Exit codes: 0 completed; 1 training failed (non-finite loss, no generator, data error); 2 bad
command line, config or launch, an ``--output`` holding a run, a resume that is missing or does not
fit; 130 interrupted by SIGINT/SIGTERM (a checkpoint was saved first; ``--resume auto`` continues).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from infra.cli_parser import SuggestingParser
from infra.registry import PluginError
from trainer.config import ConfigError, TrainConfig, available_presets, build_config, method_names
from trainer.data.config import REPLAY_STORAGE
from trainer.data.replay_evict import EVICTION_POLICIES
from trainer.data.sources import SOURCES
from trainer.kwargs_arg import kwargs_token, merge_kwargs
from trainer.trackers import TRACKERS

S = argparse.SUPPRESS
#: exit status of a run stopped because no generator delivered for --generator-timeout seconds
EXIT_GENERATORS_SILENT = 3
#: exit status of a run stopped by SIGINT / SIGTERM (128 + SIGINT, the shell's convention)
EXIT_INTERRUPTED = 130


# (group title, flags, config path, argparse keyword arguments)
_FLAGS: list[tuple[str, tuple[str, ...], str, dict[str, Any]]] = [
    ("model", ("--model",), "model.name", dict(metavar="TIMM_NAME", help=(
        "timm backbone name; another model than the preset's / config's drops their model_kwargs"))),
    ("model", ("--model-kwargs",), "model.model_kwargs",
     dict(nargs="+", type=kwargs_token, metavar="KEY=VALUE", help="extra timm.create_model arguments, e.g. patch_size=8 depth=6")),
    ("model", ("--img-size",), "model.img_size", dict(type=int, help="training resolution (crop side)")),
    ("model", ("--head-hidden",), "model.head_hidden", dict(type=int, help="projection head hidden width")),
    ("model", ("--head-out",), "model.head_out", dict(type=int, help="projection head output (feature) width")),
    ("model", ("--head-layers",), "model.head_layers", dict(type=int, help="projection head Linear layers")),
    ("model", ("--sync-bn",), "model.sync_bn", dict(action="store_const", const=True, help="SyncBatchNorm across processes")),
    ("model", ("--head-per-view",), "model.head_per_view", dict(action="store_const", const=True, help="projection head once per view chunk (official)")),
    ("model", ("--head-all-views",), "model.head_per_view", dict(action="store_const", const=False, help="one projection head call over all images")),
    ("model", ("--no-sync-bn",), "model.sync_bn", dict(action="store_const", const=False, help="per-process BatchNorm")),
    ("model", ("--text-kwargs",), "model.text", dict(nargs="+", type=kwargs_token, metavar="KEY=VALUE", help="text tower size for clip / stablerep+, e.g. layers=4 width=256")),
    ("method", ("--method",), "method.name", dict(choices=method_names, help="training objective: stablerep (multi-positive), stablerep+ (with image-text terms), simclr, clip, or one an installed plugin adds (entry-point group stablerep.methods)")),
    ("method", ("--temperature",), "method.temperature", dict(type=float, help="contrastive temperature T")),
    ("method", ("--method-kwargs",), "method.kwargs", dict(nargs="+", type=kwargs_token, metavar="KEY=VALUE", help="extra build_method arguments")),
    ("augmentation", ("--weak-aug",), "augment.strong", dict(action="store_const", const=False, help="the official weak augmentation: RandomResizedCrop (scale 0.5-1 unless --scale-min) only, no flip")),
    ("augmentation", ("--strong-aug",), "augment.strong", dict(action="store_const", const=True, help="the paper's strong augmentation")),
    ("augmentation", ("--scale-min",), "augment.scale_min", dict(type=float, help="RandomResizedCrop lower scale")),
    ("augmentation", ("--blur-p",), "augment.blur_p", dict(type=float, help="probability of the Gaussian blur (strong recipe)")),
    ("augmentation", ("--downsample",), "augment.downsample", dict(type=int, metavar="SIDE", help="shrink images to SIDE before augmenting")),
    ("augmentation", ("--down-res",), "augment.down_res", dict(nargs="+", type=int, metavar="SIDE", help="official random down-and-up resize to one of these sides (e.g. 64 128)")),
    ("augmentation", ("--down-prob", "--downsample-prob"), "augment.down_prob", dict(type=float, help="probability per image of the down-and-up resize (official 0.05)")),
    ("augmentation", ("--crops-per-image", "--num-crop"), "augment.crops_per_image", dict(type=int, help="augmented crops of every drawn image (official num_crop)")),
    ("data", ("--source",), "data.source", dict(choices=SOURCES.names(), help="online: groups streamed from generator services; offline: shards on disk")),
    ("data", ("--generators",), "data.generators", dict(nargs="+", metavar="ENDPOINT", help="online: generator endpoints tcp://HOST:PORT")),
    ("data", ("--data",), "data.data", dict(nargs="+", metavar="DIR", help="offline: shard directories or URLs (s3://bucket/shards, gs://, hf://, https://)")),
    ("data", ("--folders", "--folder-list"), "data.folders", dict(nargs="+", metavar="DIR", help="offline official layout: the image folders of the CSV, any names (official --folder_list; default seed*/ beside the CSV)")),
    ("data", ("--captions-per-step", "--batch-captions"), "data.captions_per_step", dict(type=int, help="captions per optimizer step over all processes (each rank takes captions-per-step / world size); --batch-captions is a deprecated alias")),
    ("data", ("--draw-per-caption", "--images-per-caption"), "data.draw_per_caption", dict(type=int, help="images drawn from each caption group per step (n; the official n_img); --images-per-caption is a deprecated alias")),
    ("data", ("--image-size",), "data.image_size", dict(type=int, help="stored image side: online replay buffer, offline decode (default: the generator's save size)")),
    ("data", ("--connect-timeout",), "data.connect_timeout", dict(type=float, metavar="SECONDS", help="online: seconds to wait for the first welcome of a generator")),
    ("data", ("--sample-timeout",), "data.sample_timeout", dict(type=float, metavar="SECONDS", help="online: seconds one step may wait for enough eligible groups before the run fails")),
    ("data", ("--generator-timeout",), "data.generator_timeout", dict(type=float, metavar="SECONDS", help="online: no new group from any generator for this long -> save a checkpoint and exit 3 (a warning comes after a third of it; default 600)")),
    ("data", ("--curve-keys",), "data.curve_keys", dict(metavar="DIR", help="online: CurveZMQ keys (DIR/server.key, DIR/client.key_secret) for generators run with --curve-keys")),
    ("data", ("--credits",), "data.credits", dict(type=int, help="online: groups in flight per generator")),
    ("data", ("--feedback-every",), "data.feedback_every", dict(type=int, metavar="STEPS", help="online: every STEPS steps send each generator the difficulty (moving average of the loss) of the captions it served that were trained on since the last report; 0: off")),
    ("data", ("--feedback-decay",), "data.feedback_decay", dict(type=float, help="weight of a caption's previous difficulty in its moving average, in [0, 1)")),
    ("data", ("--num-workers",), "data.num_workers", dict(type=int, help="offline: decoding workers")),
    ("data", ("--index-cache",), "data.index_cache", dict(metavar="DIR", help="offline: where scans of tars without a shard index are cached (default: beside the tars; for read-only folders)")),
    ("data", ("--allow-mixed-data",), "data.allow_mixed", dict(action="store_const", const=True, help="offline: accept --data inputs of different image sizes or images per group (refused by default)")),
    ("data", ("--fetch-ahead",), "data.fetch_ahead", dict(type=int, metavar="GETS", help="offline from an object store: ranged GETs (one per group) each decoding worker keeps in flight")),
    ("data", ("--no-direct-gets",), "data.direct_gets", dict(action="store_const", const=False, help="offline from an object store: send every ranged GET through the fsspec filesystem's client instead of straight to the store over a signed URL (for stores that need headers the filesystem adds)")),
    ("data", ("--dataset-captions",), "data.dataset_captions", dict(type=int, help="captions per epoch (for --epochs)")),
    ("replay", ("--replay-capacity",), "replay.capacity_groups", dict(type=int, metavar="GROUPS", help="buffer slots (default: 8 batches' worth)")),
    ("replay", ("--replay-gib",), "replay.capacity_gib", dict(type=float, metavar="GIB", help="buffer size in GiB instead of groups")),
    ("replay", ("--replay-storage",), "replay.storage", dict(choices=REPLAY_STORAGE, help="auto: GPU memory when the buffer fits beside the training step's estimated peak with headroom, else pinned host memory")),
    ("replay", ("--replay-evict",), "replay.evict", dict(choices=EVICTION_POLICIES.names(), help="which group leaves a full buffer first")),
    ("replay", ("--max-reuse",), "replay.max_reuse", dict(type=int, help="draws after which a group retires")),
    ("replay", ("--min-fresh",), "replay.min_fresh", dict(type=float, help="fraction of never-drawn groups per batch")),
    ("replay", ("--samples-per-insert",), "replay.samples_per_insert", dict(type=float, metavar="R", help="rate contract: at most R draws per group inserted (a batch waits, counted as stall, while draws would exceed R x inserts + --spi-tolerance); default: no contract")),
    ("replay", ("--spi-tolerance",), "replay.spi_tolerance", dict(type=float, metavar="E", help="rate contract: draws allowed beyond R x inserts")),
    ("replay", ("--hard-negatives",), "replay.hard_fraction", dict(type=float, metavar="FRACTION", help="fraction of batches made of caption cells: an anchor caption and captions differing from it in one word (default 0)")),
    ("replay", ("--cell-size",), "replay.cell_size", dict(type=int, help="captions per caption cell of --hard-negatives batches")),
    ("replay", ("--cell-words",), "replay.cell_words", dict(nargs="+", metavar="WORD", help="the words a caption cell may vary, e.g. the object nouns (default: any word)")),
    ("optimizer", ("--lr",), "optim.lr", dict(type=float, help="peak lr (default, the official rule: base lr x captions x draw / 256 x crops / 2)")),
    ("optimizer", ("--base-lr",), "optim.base_lr", dict(type=float, help="lr per 256 images")),
    ("optimizer", ("--betas",), "optim.betas", dict(nargs=2, type=float, metavar=("B1", "B2"), help="AdamW betas")),
    ("optimizer", ("--eps",), "optim.eps", dict(type=float, help="AdamW epsilon")),
    ("optimizer", ("--weight-decay", "--wd"), "optim.weight_decay", dict(type=float, help="AdamW weight decay (none on biases and norms)")),
    ("optimizer", ("--wd-embeddings",), "optim.wd_embeddings", dict(action="store_const", const=True, help="weight-decay the class token and position embeddings like every other >= 2-D weight (official)")),
    ("optimizer", ("--no-wd-embeddings",), "optim.wd_embeddings", dict(action="store_const", const=False, help="no weight decay on the class token and position embeddings (timm's no_weight_decay)")),
    ("optimizer", ("--grad-clip",), "optim.grad_clip", dict(type=float, metavar="MAX_NORM", help="clip the gradient norm to MAX_NORM (default: no clipping)")),
    ("schedule", ("--steps",), "schedule.steps", dict(type=int, help="optimizer steps of the whole run")),
    ("schedule", ("--epochs",), "schedule.epochs", dict(type=float, help="run length in epochs of --dataset-captions")),
    ("schedule", ("--warmup-steps",), "schedule.warmup_steps", dict(type=int, help="linear lr warmup steps (default: from --warmup-epochs)")),
    ("schedule", ("--warmup-epochs",), "schedule.warmup_epochs", dict(type=float, help="linear lr warmup in epochs of --dataset-captions")),
    ("schedule", ("--min-lr",), "schedule.min_lr", dict(type=float, help="lr at the end of the cosine decay")),
    ("schedule", ("--resume-lr",), "schedule.resume_lr", dict(choices=["continue", "replan"], help=(
        "a --resume with another --steps: continue = a new cosine from the lr the checkpoint reached down to "
        "--min-lr at the new end (no jump; a finished run, whose lr has decayed, is refused); replan = the lr of "
        "a run planned with the new length from the start (it jumps)"))),
    ("run", ("--output", "-o"), "run.output", dict(metavar="DIR", help="run directory")),
    ("run", ("--precision",), "run.precision", dict(choices=["bf16", "fp16", "no"], help="mixed precision of the autocast region (no = fp32)")),
    ("run", ("--seed",), "run.seed", dict(type=int, help="seed of model init, sampling and augmentation")),
    ("run", ("--save-every",), "run.save_every", dict(type=int, metavar="STEPS", help="steps between checkpoints (one is always written at the end and on Ctrl-C)")),
    ("run", ("--resume",), "run.resume", dict(metavar="PATH|auto", help=(
        "checkpoint dir, or auto = OUTPUT/checkpoints/last; the checkpoint's model, method, data layout and "
        "schedule must match this config (checked before anything is written)"))),
    ("run", ("--overwrite",), "run.overwrite", dict(action="store_const", const=True, help=(
        "replace the run already in --output: its run files (config.yaml, checkpoints/, backbone.*, "
        "train_summary.json, train.log, curve.png, stablerep/) are deleted when the new run starts; without "
        "this flag or --resume an --output holding a run is refused"))),
    ("run", ("--compile",), "run.compile", dict(action="store_const", const=True, help="torch.compile the model")),
    ("run", ("--log-every",), "run.log_every", dict(type=int, metavar="STEPS", help="steps between tracker (tensorboard / wandb) logs")),
    ("run", ("--log-with",), "run.log_with", dict(nargs="*", choices=TRACKERS, help="trackers; give the flag alone for none")),
    ("run", ("--no-progress",), "run.progress", dict(action="store_const", const=False, help="no progress bar: plain status lines on stdout instead (also when stdout is not a terminal)")),
    ("run", ("--status-every",), "run.status_every", dict(type=float, metavar="SECONDS", help="seconds between plain status lines (stdout without a bar, and always RUN/train.log)")),
    ("run", ("--cpu",), "run.cpu", dict(action="store_const", const=True, help="train on the CPU even with a GPU present")),
    ("run", ("--metrics-port",), "run.metrics_port",
     dict(type=int, metavar="PORT", help="serve Prometheus metrics (stablerep_trainer_*) on this port (0: any)")),
    ("monitor", ("--monitor", "--monitor-dirs"), "monitor.dirs", dict(nargs="+", metavar="DIR", help="probe ImageFolders with train/ and val/ (as `stablerep-generator probe-set` writes): weighted k-NN of the backbone on each, to OUTPUT/monitor.jsonl (under torchrun / accelerate launch write --monitor-dirs: their parsers read --monitor as their --monitor-interval)")),
    ("monitor", ("--monitor-every",), "monitor.every", dict(type=int, metavar="STEPS", help="steps between monitor evaluations (also at step 0 and the last step); the default keeps the monitor of the demo's probe sets at the default --monitor-max-train / --monitor-max-val under 5%% of the training time (benchmarks/RESULTS.md)")),
    ("monitor", ("--knn-k",), "monitor.knn_k", dict(type=int, help="k-NN neighbours per query")),
    ("monitor", ("--knn-temperature",), "monitor.knn_temperature", dict(type=float, help="k-NN vote weight exp(cosine / T)")),
    ("monitor", ("--monitor-linear",), "monitor.linear", dict(action="store_const", const=True, help="also a quick linear probe on the monitor's features")),
    ("monitor", ("--monitor-max-train",), "monitor.max_train", dict(type=int, metavar="IMAGES", help="train images per probe the monitor embeds, its k-NN's bank of neighbours: a class-balanced subset drawn once per run (the same at every evaluation); 0 = every image (what `stablerep-eval knn` scores). A smaller bank reads lower than the whole folder (benchmarks/RESULTS.md)")),
    ("monitor", ("--monitor-max-val",), "monitor.max_val", dict(type=int, metavar="IMAGES", help="val images per probe the monitor classifies: a class-balanced subset drawn once per run; 0 = every image")),
    ("monitor", ("--monitor-max-images",), "monitor.max_images", dict(type=int, metavar="IMAGES", help="both --monitor-max-train and --monitor-max-val (each given on its own wins)")),
    ("monitor", ("--monitor-batch-size",), "monitor.batch_size", dict(type=int, metavar="IMAGES", help="images per monitor feature-extraction batch")),
    ("run", ("--force",), "run.force", dict(action="store_const", const=True, help="train paper-scale settings on a CPU anyway (normally refused)")),
]


EPILOG = """\
exit codes: 0 completed, 1 training failed, 2 bad command line, config or launch (also: --output
  holds a run and neither --resume nor --overwrite was given; --resume names no checkpoint; the
  checkpoint's model, method, data layout or schedule differs from this config),
  3 generation stopped: no new group for --generator-timeout seconds (a checkpoint is saved first),
  130 interrupted by SIGINT/SIGTERM (a checkpoint is saved first; --resume auto continues)

status lines (stdout when it is not a terminal or with --no-progress; always RUN/train.log):
  step done/total | loss of the last step | lr | img/s over all processes |
  reuse = mean draws per group in the replay buffer | fresh = share of never-drawn groups in
  the last batch | stall = seconds spent waiting for generators (and the rate contract), with the
  share of the time since the previous line in brackets | ETA at the current speed
  (reuse, fresh and stall come from the online source only)

resume: --resume auto continues OUTPUT's run; --steps may change: the lr goes on from where the
  checkpoint left it (new cosine to --min-lr), or --resume-lr replan follows the new length's schedule

multi-process: torchrun --nproc_per_node N -m trainer.cli ... (add --cpu without GPUs), or
  accelerate launch --multi_gpu --num_processes N -m trainer.cli ...; see docs/workflows.md
"""


#: flags that set several fields of one group to their value (an integer >= 0) -> those fields
SHORTHANDS = {"monitor.max_images": ("monitor.max_train", "monitor.max_val")}


def _default_of(path: str) -> Any:
    group, name = path.split(".")
    return getattr(getattr(TrainConfig(), group), name)


def _preset_parser(add_help: bool) -> tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    parser = SuggestingParser(
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
    parser.epilog = EPILOG
    preset_group.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for title, flags, path, kwargs in _FLAGS:
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        kwargs = dict(kwargs)
        if callable(kwargs.get("choices")):  # a registry's names, read when the parser is built
            kwargs["choices"] = kwargs["choices"]()
        if kwargs.get("action") != "store_const" and "choices" not in kwargs:
            kwargs.setdefault("metavar", flags[0].lstrip("-").upper().replace("-", "_"))
        if path in SHORTHANDS:
            kwargs["help"] = f"{kwargs['help']} [{' and '.join(SHORTHANDS[path])}]"
        elif kwargs.get("action") != "store_const":
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
            value = merge_kwargs(value)
        out.setdefault(group, {})[name] = value
    for path, fields in SHORTHANDS.items():  # a field given on its own wins over its shorthand
        group, name = path.split(".")
        if name in out.get(group, {}):
            value = out[group].pop(name)
            if value < 0:
                raise ConfigError(f"config field {path} = {value}: must be an integer >= 0 (0 = every image)")
            for field in fields:
                out[group].setdefault(field.split(".")[1], value)
    return out


def parse_config(argv: Sequence[str]) -> tuple[TrainConfig, argparse.Namespace]:
    """argv -> validated config (raises ``ConfigError``; argparse exits with 2 on bad flags)."""
    ns = build_parser().parse_args(list(argv))
    overrides = overrides_from_args(ns)
    cfg = build_config(preset=ns.preset, config_file=ns.config, overrides=overrides, validate=False)
    _drop_other_models_kwargs(cfg, ns, overrides.get("model", {}))
    if not ns.print_config:
        from trainer.preflight import check_data_paths

        check_data_paths(cfg)  # the most fundamental error first: no data (before derived schedule checks)
        cfg.validate()
    return cfg, ns


def _drop_other_models_kwargs(cfg: TrainConfig, ns: argparse.Namespace, model_flags: dict[str, Any]) -> None:
    """``--model X`` naming another model than the preset's / config's: their ``model_kwargs`` belong to
    their own model and are dropped (with a note); only ``--model-kwargs`` given with it stay."""
    if "name" not in model_flags:
        return
    below = build_config(preset=ns.preset, config_file=ns.config, validate=False).model
    if below.name == model_flags["name"] or not below.model_kwargs:
        return
    given = dict(model_flags.get("model_kwargs") or {})
    print(f"stablerep-train: note: --model {model_flags['name']}: dropped model_kwargs {below.model_kwargs} of "
          f"{below.name} (from the preset / config)" + (f"; kept {given} from --model-kwargs" if given else
                                                         "; give --model-kwargs to set some"), file=sys.stderr)
    cfg.model.model_kwargs = given


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
    except (ConfigError, PluginError) as exc:  # PluginError: an installed method that does not import
        print(f"stablerep-train: error: {exc}", file=sys.stderr)
        return 2
    if ns.print_config:  # also for a config still missing its data (e.g. a preset without --generators)
        try:
            cfg.validate()
        except (ConfigError, PluginError) as exc:
            print(f"stablerep-train: note: not runnable as is: {exc}", file=sys.stderr)
        try:
            print(yaml.safe_dump(cfg.resolved_dict(), sort_keys=False), end="")
        except (ConfigError, ValueError, ZeroDivisionError, PluginError) as exc:
            print(f"stablerep-train: error: {exc}", file=sys.stderr)
            return 2
        return 0

    from trainer.launch import LaunchError
    from trainer.loop import NonFiniteLossError, train
    from trainer.data.sources.generator_watch import GeneratorsSilentError
    from trainer.data.sources.online import GroupStreamError

    try:
        summary = train(cfg)
    except (ConfigError, LaunchError) as exc:
        print(f"stablerep-train: error: {exc}", file=sys.stderr)
        return 2
    except GeneratorsSilentError as exc:
        print(f"stablerep-train: generation stopped: {exc}", file=sys.stderr)
        return EXIT_GENERATORS_SILENT
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, without a final checkpoint
        print("stablerep-train: interrupted twice: stopped without a final checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (NonFiniteLossError, GroupStreamError, ConnectionError, TimeoutError, FileNotFoundError,
            ValueError) as exc:
        print(f"stablerep-train: training failed: {exc}", file=sys.stderr)
        return 1
    summary_path = Path(cfg.run.output) / "train_summary.json"
    code = EXIT_INTERRUPTED if summary["interrupted"] else 0
    if not _is_main_process():
        return code
    summary_path.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    last = summary["losses"][-1] if summary["losses"] else float("nan")
    print(
        f"stablerep-train: {summary['stopped']} at step {summary['steps']}/{summary['total_steps']}, "
        f"loss {last:.4f}, {summary['images_per_s']:.1f} images/s; checkpoint {summary['checkpoint']}"
    )
    return code


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


if __name__ == "__main__":
    sys.exit(main())
