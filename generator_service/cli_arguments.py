"""``stablerep-generator``'s flags: the parser, the ``--config`` YAML defaults, and their checks.

Every list of choices comes from where the choices are defined: backend names from the registry
(``BACKENDS.names()``), recipes from `generator_service.recipes`, schedulers from
`generator_service.schedulers`, dtypes and attention kernels from `generator_service.config`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from generator_service.backends import BACKENDS, backend_facts
from generator_service.caption_policy import CAPTION_POLICIES, DEFAULT_HARD_ALPHA, DEFAULT_HARD_FLOOR
from generator_service.config import ATTENTIONS, DTYPES, RANDOM_MODELS, GeneratorConfig
from generator_service.preflight import backend_name
from generator_service.recipes import RECIPE_NAMES
from generator_service.schedulers import SCHEDULER_NAMES
from generator_service.shards import IMAGE_FORMATS
from infra.cli_parser import SuggestingParser

PROG = "stablerep-generator"


class CliError(ValueError):
    """Bad input the user can fix; printed without a traceback, exit status 2."""


def _shard_spec(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected i/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need N >= 1 and 0 <= i < N")
    return index, count


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(
        prog=PROG,
        description="Synthesize groups of images per caption; write shards (--out) and/or serve them (--bind). "
        f"Subcommands: {PROG} captions ... | {PROG} probe-set ... (see their --help).",
    )
    parser.add_argument("--config", help="YAML file of defaults for any of the flags below")
    group = parser.add_argument_group("captions")
    group.add_argument("--captions", help="caption file: .txt, .csv, .tsv, .jsonl or .parquet")
    group.add_argument("--caption-column", default="caption", help="column / key holding the caption (default: caption)")
    group.add_argument("--shard", type=_shard_spec, default=(0, 1), metavar="i/N",
                       help="generate only caption shard i of N (positions i, i+N, ...)")
    group.add_argument("--seed", type=int, default=0, help="base seed: image j of caption c uses image_seed(seed, c, j)")
    group = parser.add_argument_group("generator (unset: the recipe's, then the backend's defaults)")
    group.add_argument("--backend", default=GeneratorConfig.backend, type=backend_name,
                       help=f"{' | '.join(BACKENDS.names())} (default %(default)s: CPU, no weights; "
                       "checked before any worker starts)")
    group.add_argument("--recipe", choices=list(RECIPE_NAMES),
                       help="named sampler settings of the diffusers backend (default paper); flags given override them")
    group.add_argument("--model", help=f"diffusers pipeline folder, hub id or {' | '.join(RANDOM_MODELS)}")
    group.add_argument("--scheduler", help=f"{' | '.join(SCHEDULER_NAMES)}")
    group.add_argument("--steps", type=int, help="denoising steps (paper: DDIM 50)")
    group.add_argument("--guidance", type=float, help="classifier-free guidance scale (paper: 2)")
    group.add_argument("--eta", type=float, help="DDIM eta (paper: 0)")
    group.add_argument("--height", type=int, help="generated image height in pixels (paper: 512)")
    group.add_argument("--width", type=int, help="generated image width in pixels (paper: 512)")
    group.add_argument("--save-size", type=int, help="side of the saved / served images")
    group.add_argument("--images-per-group", "--images-per-caption", type=int, dest="images_per_group",
                       help="m, images generated and stored per caption group (--images-per-caption: deprecated alias)")
    group.add_argument("--dtype", choices=list(DTYPES), help="weights and activations dtype of the diffusers pipeline")
    group.add_argument("--attention", choices=list(ATTENTIONS), help="attention kernel of the diffusers pipeline")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    group.add_argument("--lora", metavar="PATH_OR_ID", help="LoRA adapter (folder, .safetensors or hub id; 'none'), fused")
    group.add_argument("--lora-scale", type=float, help="strength the adapter is fused at (default 1.0)")
    group.add_argument("--vae", metavar="default|tiny:PATH_OR_ID|tiny:random",
                       help="decoder: the pipeline's own, or diffusers AutoencoderTiny (TAESD) weights")
    group = parser.add_argument_group("devices")
    group.add_argument("--gpus", default="auto", help="0-3 | 0,2 | cpu | cpu:N | auto (default: every GPU, else one CPU worker)")
    group.add_argument("--worker-batch", "--batch-captions", type=int, default=8, dest="worker_batch",
                       help="captions per backend call in each worker (default 8; --batch-captions: deprecated alias)")
    group = parser.add_argument_group("online")
    group.add_argument("--bind", help="serve protocol v1 here, e.g. tcp://127.0.0.1:5555")
    group.add_argument("--queue", type=int, default=64, help="groups queued for clients before workers pause (default 64)")
    group.add_argument("--heartbeat-ms", type=int, default=1000, help="online: heartbeat interval; a client silent for 3 intervals is dead (default: %(default)s)")
    group.add_argument("--archive", help="with --bind: also write every served group to shards in this directory")
    group.add_argument("--state", metavar="DIR",
                       help="endless online run: keep the position in DIR/online_state.json so that a restart (even "
                            "after kill -9) serves new groups, never the same ids and seeds again (default: the "
                            "--archive directory)")
    group.add_argument("--caption-policy", default="uniform", choices=CAPTION_POLICIES.names(),
                       help="endless online run: which caption comes next: uniform (each in turn, epoch after epoch) "
                            "or hard (more of the captions trainers' feedback scores higher) (default: %(default)s)")
    group.add_argument("--hard-floor", type=float, default=DEFAULT_HARD_FLOOR,
                       help="hard: a caption weighs (floor + score / median score) ** alpha; 0: no floor, a caption "
                            "scored 0 is not drawn (default: %(default)s)")
    group.add_argument("--hard-alpha", type=float, default=DEFAULT_HARD_ALPHA,
                       help="hard: the exponent alpha of that weight (default: %(default)s)")
    group.add_argument("--status-every", type=float, default=5.0, help="seconds between online status lines")
    group.add_argument("--metrics-port", type=int,
                       help="serve Prometheus metrics (stablerep_generator_*) on this port (0: any free port)")
    group.add_argument("--max-credit", type=int, default=256,
                       help="most credit one client may hold (credit + unacknowledged groups; announced in welcome)")
    group.add_argument("--max-clients", type=int, default=64, help="most client sessions at once (default 64)")
    group.add_argument("--max-client-mib", type=float, default=512.0,
                       help="most MiB of sent, unacknowledged groups per client (default 512)")
    group.add_argument("--curve-keys", metavar="DIR",
                       help="require CurveZMQ: encrypt every session and accept only client keys in DIR/authorized "
                            f"(make DIR with `{PROG} keys DIR`; trainers take the same --curve-keys DIR)")
    group.add_argument("--announce-host", action="store_true", help="name this host and pid in welcome")
    group = parser.add_argument_group("offline")
    group.add_argument("--out", help="write one pass over the captions to WebDataset shards in this directory")
    group.add_argument("--shard-size", type=int, default=1000, help="groups per shard (default 1000)")
    group.add_argument("--format", default="png", choices=sorted(IMAGE_FORMATS), help="image format in shards")
    group.add_argument("--quality", type=int, default=95, help="jpg / webp quality")
    group = parser.add_argument_group("run")
    group.add_argument("--max-groups", type=int, help="stop after this many groups")
    group.add_argument("--max-groups-per-s", type=float,
                       help="throttle: hand out at most this many groups per second (simulates a slower device; "
                            "0: none; default: none, but the backend's own rate when it only serves online: "
                            f"{backend_facts('procedural').online_groups_per_s:g} for procedural, about what a CPU "
                            "trainer draws)")
    group.add_argument("--preview", help="write a labelled grid of the first groups to this .png")
    group.add_argument("--preview-groups", type=int, default=8, help="rows of the preview grid (default 8)")
    group.add_argument("--drain-timeout", type=float, default=300.0, help="seconds a stop waits for in-flight groups")
    group.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity (default: %(default)s)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CliError(f"--config {path}: file not found") from None
    except yaml.YAMLError as exc:
        raise CliError(f"--config {path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CliError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    known = {action.dest for action in parser._actions if action.dest not in ("help", "config")}
    defaults = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest in DEPRECATED_KEYS:
            print(f"stablerep-generator: warning: --config key {key!r} is deprecated; use {DEPRECATED_KEYS[dest]!r}",
                  file=sys.stderr)
            dest = DEPRECATED_KEYS[dest]
        if dest not in known:
            raise CliError(f"--config {path}: unknown key {key!r}; known: {', '.join(sorted(known))}")
        if dest == "shard" and isinstance(value, str):
            value = _shard_spec(value)
        defaults[dest] = value
    return defaults


#: Old flag / config key -> its name now; the old ones still work and print a warning.
DEPRECATED_FLAGS = {"--images-per-caption": "--images-per-group", "--batch-captions": "--worker-batch"}
DEPRECATED_KEYS = {"images_per_caption": "images_per_group", "batch_captions": "worker_batch"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Two-stage parse: ``--config`` YAML sets defaults, command-line flags override them."""
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name in DEPRECATED_FLAGS:
            print(f"stablerep-generator: warning: {name} is deprecated; use {DEPRECATED_FLAGS[name]}", file=sys.stderr)
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**_yaml_defaults(parser, first.config))
    return parser.parse_args(argv)


def generator_config(args: argparse.Namespace) -> GeneratorConfig:
    fields = dict(
        backend=args.backend,
        model=args.model,
        scheduler=args.scheduler,
        steps=args.steps,
        guidance=args.guidance,
        eta=args.eta,
        height=args.height,
        width=args.width,
        save_size=args.save_size,
        images_per_group=args.images_per_group,
        dtype=args.dtype,
        attention=args.attention,
        compile=args.compile,
        recipe=args.recipe,
        lora=args.lora,
        lora_scale=args.lora_scale,
        vae=args.vae,
    )
    return GeneratorConfig(**{key: value for key, value in fields.items() if value is not None})


def check_bind(endpoint: str) -> None:
    """``--bind``: ``tcp://HOST:PORT`` (PORT 0-65535 or ``*``) or ``ipc://PATH``; CliError naming the problem."""
    if endpoint.startswith("ipc://") and len(endpoint) > len("ipc://"):
        return
    if not endpoint.startswith("tcp://"):
        raise CliError(f"--bind {endpoint}: expected tcp://HOST:PORT (e.g. tcp://127.0.0.1:5555) or ipc://PATH")
    host, sep, port = endpoint[len("tcp://"):].rpartition(":")
    if not sep or not host:
        raise CliError(f"--bind {endpoint}: no port; expected tcp://HOST:PORT (e.g. tcp://127.0.0.1:5555)")
    if port != "*" and not (port.isdigit() and 0 <= int(port) <= 65535):
        raise CliError(f"--bind {endpoint}: port {port!r} is not a number in 0-65535 (or * for any free port)")


def is_loopback(endpoint: str) -> bool:
    """True for ``tcp://127.x.x.x:PORT``, ``tcp://localhost:...``, ``tcp://[::1]:...``, ``ipc://`` and ``inproc://``."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.")
