"""``stablerep-generator``: synthesize caption groups offline (shards), online (protocol v1) or both.

    stablerep-generator --captions caps.txt --out shards/ [--gpus 0-3] [...]
    stablerep-generator --captions caps.txt --bind tcp://127.0.0.1:5555 [--archive shards/]
    stablerep-generator captions --n 1000 --out caps.txt [--seed 0]
    stablerep-generator probe-set --out probe/ [--attribute shape]

``--config run.yaml`` sets defaults for any flag (keys are flag names, ``-`` or ``_``); flags on
the command line override it. The resolved settings are written to ``OUT/config.yaml``.

This module dispatches and maps failures to exit statuses; the flags are in
`generator_service.cli_arguments`, the run in `generator_service.cli_run`, the ``keys`` and
``probe-set`` tools in `generator_service.cli_subcommands`.
"""
from __future__ import annotations

import sys

from generator_service.cli_arguments import PROG, CliError
from generator_service.cli_run import EXIT_INTERRUPTED, run
from generator_service.cli_subcommands import keys_main, probe_set_main
from generator_service.devices import DeviceSpecError
from generator_service.pool import PoolError
from generator_service.preflight import PreflightError
from generator_service.shards import ShardError
from infra.registry import PluginError
from protocol.server import BindError, ServerFailed

SUBCOMMANDS = ("captions", "probe-set", "keys")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``stablerep-generator``; returns the exit status.

    0 completed, 1 failed run, 2 bad input (found before any worker starts; a backend plugin that
    fails to import included), 130 stopped by
    SIGINT/SIGTERM (shards are flushed and the manifest written first).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "captions":
            from generator_service.procedural.cli import main_captions

            return main_captions(argv[1:])
        if argv and argv[0] == "probe-set":
            return probe_set_main(argv[1:])
        if argv and argv[0] == "keys":
            return keys_main(argv[1:])
        return run(argv)
    except SystemExit as exc:  # argparse: --help or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CliError, PreflightError, DeviceSpecError, ShardError, FileNotFoundError, ValueError, PluginError) as exc:
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
