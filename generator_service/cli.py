"""``stablerep-generator``: synthesize caption groups offline (shards), online (protocol v1) or both.

    stablerep-generator --captions caps.txt --out shards/ [--gpus 0-3] [...]
    stablerep-generator --captions caps.txt --bind tcp://127.0.0.1:5555 [--archive shards/]
    stablerep-generator captions --n 1000 --out caps.txt [--seed 0]
    stablerep-generator probe-set --out probe/ [--attribute shape]

``--config run.yaml`` sets defaults for any flag (keys are flag names, ``-`` or ``_``); flags on
the command line override it. The resolved settings are written to ``OUT/config.yaml``.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from generator_service.backends import backend_facts
from generator_service.config import GeneratorConfig
from generator_service.devices import DeviceSpecError, parse_devices, visible_cuda_count
from generator_service.pool import PoolError, StopSignal, WorkerPool
from generator_service.preflight import PreflightError, backend_name, check_captions, check_model
from generator_service.recipes import RECIPE_NAMES
from generator_service.shards import IMAGE_FORMATS, ShardError
from infra.cli_parser import SuggestingParser
from protocol.server import BindError, ServerFailed

log = logging.getLogger("stablerep-generator")

PROG = "stablerep-generator"
SUBCOMMANDS = ("captions", "probe-set", "keys")
RESOLVED_CONFIG_NAME = "config.yaml"
#: exit status after SIGINT / SIGTERM (128 + SIGINT); the work done so far is flushed first
EXIT_INTERRUPTED = 130


def online_throttle(backend: str, serving_only: bool, given: float | None) -> float | None:
    """The effective --max-groups-per-s: ``given`` (0 = none), else the backend's own online default
    (``BackendFacts.online_groups_per_s``) when it only serves online."""
    if given is not None:
        return given if given != 0 else None
    return backend_facts(backend).online_groups_per_s if serving_only else None


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
    group.add_argument("--backend", default="procedural", type=backend_name,
                       help="procedural (CPU, no weights) | diffusers (checked before any worker starts)")
    group.add_argument("--recipe", choices=list(RECIPE_NAMES),
                       help="named sampler settings of the diffusers backend (default paper); flags given override them")
    group.add_argument("--model", help="diffusers pipeline folder, hub id or random:sd15")
    group.add_argument("--scheduler", help="ddim | dpm++ | euler | euler-a | lcm | ...")
    group.add_argument("--steps", type=int, help="denoising steps (paper: DDIM 50)")
    group.add_argument("--guidance", type=float, help="classifier-free guidance scale (paper: 2)")
    group.add_argument("--eta", type=float, help="DDIM eta (paper: 0)")
    group.add_argument("--height", type=int, help="generated image height in pixels (paper: 512)")
    group.add_argument("--width", type=int, help="generated image width in pixels (paper: 512)")
    group.add_argument("--save-size", type=int, help="side of the saved / served images")
    group.add_argument("--images-per-group", "--images-per-caption", type=int, dest="images_per_group",
                       help="m, images generated and stored per caption group (--images-per-caption: deprecated alias)")
    group.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="weights and activations dtype of the diffusers pipeline")
    group.add_argument("--attention", choices=["sdpa", "xformers"], help="attention kernel of the diffusers pipeline")
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


def _devices(spec: str | int) -> list[str]:
    spec = str(spec)  # a YAML config may give a bare GPU index
    needs_cuda = spec.strip().lower() == "auto" or not spec.strip().lower().startswith("cpu")
    return parse_devices(spec, visible_cuda_count() if needs_cuda else None)


def write_resolved_config(directory: str, args: argparse.Namespace, config: GeneratorConfig, devices: list[str]) -> Path:
    run = {key: value for key, value in vars(args).items() if key not in ("config",)}
    run["shard"] = f"{args.shard[0]}/{args.shard[1]}"
    resolved = {"generator": config.to_dict(), "fingerprint": config.fingerprint(), "devices": devices, "run": run}
    from infra import storage

    target = storage.join(directory, RESOLVED_CONFIG_NAME)
    if not storage.is_remote(directory):
        Path(storage.local_path(directory) or directory).mkdir(parents=True, exist_ok=True)
    storage.write_bytes(target, yaml.safe_dump(resolved, sort_keys=False).encode("utf-8"))
    return Path(target) if not storage.is_remote(target) else target  # type: ignore[return-value]


# --- progress -----------------------------------------------------------------------------------


class OfflineProgress:
    """tqdm bar over caption groups, with images/s."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="group", desc="generating", disable=not enabled, dynamic_ncols=True)
        self.shown = 0

    def __call__(self, pool: WorkerPool, server: Any) -> None:
        delta = pool.groups_delivered - self.shown
        if delta:
            self.bar.update(delta)
            self.shown = pool.groups_delivered
            self.bar.set_postfix(img_s=f"{pool.stats().images_per_second:.1f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


class OnlineStatus:
    """A status line every ``every`` seconds: images/s per device, queue, clients and credits, idle time."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.last_time = time.monotonic()
        self.last_images: dict[int, int] = {}

    def __call__(self, pool: WorkerPool, server: Any) -> None:
        now = time.monotonic()
        if now - self.last_time < self.every:
            return
        dt, self.last_time = now - self.last_time, now
        rates = []
        for worker in pool.workers:
            rates.append(f"{worker.device}#{worker.index} {(worker.images - self.last_images.get(worker.index, 0)) / dt:.1f}")
            self.last_images[worker.index] = worker.images
        idle = sum(w.idle_backpressure_s for w in pool.workers)
        line = f"img/s [{', '.join(rates)}] | groups {pool.groups_delivered}"
        if server is not None:
            stats = server.stats()
            credits = sum(c["credits"] for c in stats.clients.values())
            line += (
                f" | queue {stats.queue_depth}/{stats.queue_capacity} | clients {len(stats.clients)} (credits {credits})"
                f" | sent {stats.groups_sent}"
            )
        line += f" | idle (queue full) {idle:.1f}s"
        log.info(line)

    def close(self) -> None:
        pass


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


# --- entry points -------------------------------------------------------------------------------


def _run(argv: list[str]) -> int:
    from generator_service.captions import load_captions
    from generator_service.service import ServiceOptions, run_service

    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.captions:
        raise CliError("--captions FILE is required (a .txt/.csv/.tsv/.jsonl/.parquet caption file)")
    if args.worker_batch < 1:
        raise CliError(f"--worker-batch must be >= 1, got {args.worker_batch}")
    if args.bind:
        check_bind(args.bind)
    devices = _devices(args.gpus)
    config = generator_config(args)
    check_model(config)  # before any worker starts: one line, exit 2
    captions = load_captions(args.captions, column=args.caption_column, shard=tuple(args.shard))
    check_captions(config, captions)  # the procedural grammar, before any worker starts: one line, exit 2
    options = ServiceOptions(
        config=config,
        captions=captions,
        devices=devices,
        seed=args.seed,
        worker_batch=args.worker_batch,
        out=args.out,
        archive=args.archive,
        bind=args.bind,
        queue=args.queue,
        heartbeat_ms=args.heartbeat_ms,
        shard_size=args.shard_size,
        image_format=args.format,
        quality=args.quality,
        max_groups=args.max_groups,
        preview=args.preview,
        preview_groups=args.preview_groups,
        drain_timeout=args.drain_timeout,
        max_groups_per_s=online_throttle(config.backend, bool(args.bind and not args.out), args.max_groups_per_s),
        max_credit=args.max_credit,
        max_clients=args.max_clients,
        max_client_mib=args.max_client_mib,
        announce_host=args.announce_host,
        state=args.state,
        curve_keys=args.curve_keys,
    )
    if options.max_groups_per_s is not None and args.max_groups_per_s is None:
        log.info("%s backend online: at most %g groups/s by default, about what a CPU trainer draws "
                 "(--max-groups-per-s R changes it, 0 removes it)", config.backend, options.max_groups_per_s)
    if args.bind and not is_loopback(args.bind) and not args.curve_keys:
        print(f"{PROG}: warning: serving {args.bind} without --curve-keys: anyone who can reach this address can "
              "connect, read every group and use this service's capacity (make keys with "
              f"`{PROG} keys DIR`, then pass --curve-keys DIR here and to stablerep-train)", file=sys.stderr)
    stop = StopSignal()
    restore = _install_signal_handlers(stop)
    progress: OfflineProgress | OnlineStatus | None = None

    def on_start(info: dict[str, Any]) -> None:
        nonlocal progress
        if options.shard_dir:
            write_resolved_config(options.shard_dir, args, config, devices)
        log.info(
            "generator %s (%s, %s) on %s; %s%s",
            info["fingerprint"], config.backend, config.model, ",".join(devices),
            f"serving at {info['endpoint']}" if info["endpoint"] else f"writing to {options.out}",
            f", {info['skipped']} group(s) already done" if info["skipped"] else "",
        )
        if options.bind:
            progress = OnlineStatus(args.status_every)
        else:
            progress = OfflineProgress(info["todo"], enabled=not args.no_progress)

    metrics = None
    if args.metrics_port is not None:
        from generator_service.live_metrics import GeneratorMetrics

        metrics = GeneratorMetrics(args.metrics_port)
        log.info("metrics at %s", metrics.url)

    def on_tick(pool: Any, server: Any) -> None:
        if progress is not None:
            progress(pool, server)
        if metrics is not None:
            metrics.tick(pool, server)

    try:
        result = run_service(options, stop=stop, on_start=on_start, on_tick=on_tick)
    finally:
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
        restore()
    summary = result.to_dict()
    summary["stopped_by_signal"] = stop.requested
    print(json.dumps(summary))
    return EXIT_INTERRUPTED if stop.requested else 0


def _install_signal_handlers(stop: StopSignal):
    """SIGINT/SIGTERM -> ``stop.request`` (drain, flush, exit 0); returns a function restoring the old ones."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, stop.request) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _keys(argv: list[str]) -> int:
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


def _probe_set(argv: list[str]) -> int:
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``stablerep-generator``; returns the exit status.

    0 completed, 1 failed run, 2 bad input (found before any worker starts), 130 stopped by
    SIGINT/SIGTERM (shards are flushed and the manifest written first).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "captions":
            from generator_service.procedural.cli import main_captions

            return main_captions(argv[1:])
        if argv and argv[0] == "probe-set":
            return _probe_set(argv[1:])
        if argv and argv[0] == "keys":
            return _keys(argv[1:])
        return _run(argv)
    except SystemExit as exc:  # argparse: --help or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CliError, PreflightError, DeviceSpecError, ShardError, FileNotFoundError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except BindError as exc:  # e.g. the port is taken: found before any worker starts
        print(f"{PROG}: error: --bind: {exc}", file=sys.stderr)
        return 2
    except PoolError as exc:
        print(f"{PROG}: generation failed: {exc}", file=sys.stderr)
        return 1
    except ServerFailed as exc:
        print(f"{PROG}: serving failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the bind address is taken
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
