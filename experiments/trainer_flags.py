"""Trainer flags that ``stablerep-bench demo`` and ``study`` pass through to ``stablerep-train``.

They are parsed before the command does any work, and a bad one becomes :class:`BadFlags` with the
trainer parser's one-line message (not the trainer's usage text, which names another program).
"""
from __future__ import annotations

import contextlib
import io
from typing import Sequence


class BadFlags(ValueError):
    """A flag (the command's own or one passed to the trainer) that cannot be used; one line."""


def parse_trainer_config(argv: Sequence[str]):
    """``trainer.cli.parse_config(argv)`` -> ``(TrainConfig, namespace)``; argparse errors and
    ``ConfigError`` raise :class:`BadFlags` naming the flag."""
    from trainer.cli import parse_config
    from trainer.config import ConfigError

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return parse_config(list(argv))
    except SystemExit as exc:
        lines = [line for line in captured.getvalue().splitlines() if line.strip()]
        message = (lines[-1] if lines else f"bad trainer flags (exit {exc.code})").split(": error: ", 1)[-1]
        message = message.removesuffix(" (see stablerep-train --help)")
        where = ("not a flag of this command nor of stablerep-train" if "unrecognized argument" in message
                 else "a flag passed to stablerep-train")
        raise BadFlags(f"{message} ({where})") from None
    except ConfigError as exc:
        raise BadFlags(str(exc)) from None
