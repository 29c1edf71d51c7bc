"""Bounds on decoded values: nesting depth and item count, checked without recursion.

A header is shallow by design (the deepest is ``welcome.generator.extra``: depth 3). Every
decoded header passes ``check_structure`` before anything formats or validates it, so no later
step (``repr``, schema checks, error messages) can recurse deeply or walk a huge tree.
"""
from __future__ import annotations

from typing import Any

from .errors import ProtocolError

#: Deepest nesting a header may have (the header map itself is depth 1).
MAX_HEADER_DEPTH = 6

#: Most values (map keys, map values, array items, scalars) one header may hold in total.
MAX_HEADER_ITEMS = 8192

#: Longest quotation of a peer's input in an error message or log line.
MAX_QUOTE_CHARS = 80

#: Longest ``error.message`` a peer sends or logs.
MAX_ERROR_TEXT = 300


def check_structure(value: Any, max_depth: int = MAX_HEADER_DEPTH, max_items: int = MAX_HEADER_ITEMS) -> None:
    """Raise ``ProtocolError('bad_message')`` if ``value`` nests deeper than ``max_depth`` or holds
    more than ``max_items`` values. Iterative: bounded time, no recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    items = 0
    while stack:
        node, depth = stack.pop()
        items += 1
        if items > max_items:
            raise ProtocolError("bad_message", f"header holds more than {max_items} values")
        if isinstance(node, dict):
            children: Any = [*node.keys(), *node.values()]
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        if depth >= max_depth and len(children) > 0:
            raise ProtocolError("bad_message", f"header nests deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children)


def short(value: Any, limit: int = MAX_QUOTE_CHARS) -> str:
    """A short, safe quotation of ``value``: containers by kind and size, scalars by a truncated repr."""
    if isinstance(value, dict):
        return f"<map of {len(value)}>"
    if isinstance(value, (list, tuple)):
        if len(value) <= 8 and all(isinstance(v, (int, float, bool)) or v is None for v in value):
            text = repr(list(value))
        else:
            return f"<array of {len(value)}>"
    elif isinstance(value, (str, bytes, bytearray)):
        text = repr(value[: limit + 1])
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """``text`` cut to ``limit`` characters (error messages and log lines quoting a peer)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
