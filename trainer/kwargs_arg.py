"""``--model-kwargs`` and friends, one syntax in every CLI: ``KEY=VALUE ...`` or one JSON object.

    --model-kwargs depth=6 patch_size=8        -> {"depth": 6, "patch_size": 8}
    --model-kwargs '{"depth": 6}'              -> {"depth": 6}

VALUE is read as YAML (``6`` is an int, ``true`` a bool, ``[1, 2]`` a list); ``-`` in KEY becomes ``_``.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Sequence

import yaml


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as YAML (``depth=2`` -> ("depth", 2))."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip().replace("-", "_"), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not valid YAML ({exc})") from exc


def kwargs_token(text: str) -> tuple[str, Any] | dict[str, Any]:
    """argparse ``type``: a ``KEY=VALUE`` token or a whole JSON object."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid JSON object: {exc}") from exc
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
        return value
    return key_value(text)


def merge_kwargs(tokens: Sequence[tuple[str, Any] | dict[str, Any]] | None) -> dict[str, Any] | None:
    """The tokens of one ``nargs="+"`` flag -> one dict (``None`` when the flag was not given)."""
    if tokens is None:
        return None
    out: dict[str, Any] = {}
    for token in tokens:
        out.update(token if isinstance(token, dict) else [token])
    return out


def add_kwargs_argument(parser, flag: str, help: str, **kwargs: Any) -> None:
    parser.add_argument(flag, nargs="+", type=kwargs_token, metavar="KEY=VALUE",
                        help=f"{help} (KEY=VALUE ..., or one JSON object)", **kwargs)
