"""The run behind ``stablerep-generator --captions ...``: flags -> checked settings -> `run_service`.

Everything that can be wrong with the input is found here before any worker starts (`CliError`,
`PreflightError`: exit status 2); the run itself then writes shards and/or serves protocol v1,
shows progress, serves metrics, and stops cleanly on SIGINT/SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from generator_service.backends import backend_facts
from generator_service.cli_arguments import PROG, CliError, check_bind, generator_config, is_loopback, parse_args
from generator_service.cli_progress import OfflineProgress, OnlineStatus
from generator_service.config import GeneratorConfig
from generator_service.devices import parse_devices, visible_cuda_count
from generator_service.pool import StopSignal
from generator_service.preflight import check_captions, check_model

log = logging.getLogger("stablerep-generator")

RESOLVED_CONFIG_NAME = "config.yaml"
#: exit status after SIGINT / SIGTERM (128 + SIGINT); the work done so far is flushed first
EXIT_INTERRUPTED = 130


def online_throttle(backend: str, serving_only: bool, given: float | None) -> float | None:
    """The effective --max-groups-per-s: ``given`` (0 = none), else the backend's own online default
    (``BackendFacts.online_groups_per_s``) when it only serves online."""
    if given is not None:
        return given if given != 0 else None
    return backend_facts(backend).online_groups_per_s if serving_only else None


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


def service_options(args: argparse.Namespace):
    """The checked `ServiceOptions` of ``args``: every input problem raises here, before any worker starts."""
    from generator_service.caption_policy import CaptionPolicyConfig
    from generator_service.captions import load_captions
    from generator_service.service import ServiceOptions

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
    check_captions(config, captions)  # the backend's caption grammar, if it has one: one line, exit 2
    return ServiceOptions(
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
        caption_policy=CaptionPolicyConfig(args.caption_policy, args.hard_floor, args.hard_alpha),
    )


def _warn_about_settings(args: argparse.Namespace, options) -> None:
    """Log the default online throttle; warn about serving a non-loopback address without CurveZMQ."""
    if options.max_groups_per_s is not None and args.max_groups_per_s is None:
        log.info("%s backend online: at most %g groups/s by default, about what a CPU trainer draws "
                 "(--max-groups-per-s R changes it, 0 removes it)", options.config.backend, options.max_groups_per_s)
    if args.bind and not is_loopback(args.bind) and not args.curve_keys:
        print(f"{PROG}: warning: serving {args.bind} without --curve-keys: anyone who can reach this address can "
              "connect, read every group and use this service's capacity (make keys with "
              f"`{PROG} keys DIR`, then pass --curve-keys DIR here and to stablerep-train)", file=sys.stderr)


def run(argv: list[str]) -> int:
    """Parse, check, run; prints the run's summary as one JSON line. Returns 0, or 130 after a stop signal."""
    from generator_service.service import run_service

    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = service_options(args)
    config, devices = options.config, options.devices
    _warn_about_settings(args, options)
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
