"""The argument parser of every stablerep command line: bad flags are one line with "did you mean".

``stablerep-train``, ``stablerep-generator``, ``stablerep-eval`` and ``stablerep-bench`` (their
subcommands included: ``add_subparsers`` builds subparsers of the parent's class) build their
parsers from :class:`SuggestingParser`. It differs from ``argparse.ArgumentParser`` in two ways:

- a mistyped flag or subcommand names the closest known one (``difflib`` over the option strings of
  the parser and of the subcommand chosen), e.g. ``unrecognized argument --stpes (did you mean
  --steps?)``;
- an error is one line on stderr, ``PROG: error: MESSAGE (see PROG --help)``, exit status 2, instead
  of the usage block (tens of lines for the trainer) followed by the message.

It lives in ``protocol/`` because that is the one package both services import.
"""
from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import NoReturn, Sequence

_INVALID_CHOICE = re.compile(r"invalid choice: '(?P<given>[^']*)' \(choose from (?P<choices>.*)\)")


def closest(word: str, candidates: Sequence[str]) -> str | None:
    """The candidate most like ``word`` (``difflib`` ratio >= 0.6), or ``None``."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unrecognized_message(extras: Sequence[str], flags: Sequence[str]) -> str:
    """``unrecognized argument --stpes (did you mean --steps?)`` for the first unknown flag in ``extras``."""
    unknown = [a for a in extras if a.startswith("-") and a != "-"]
    if not unknown:
        return f"unrecognized arguments: {' '.join(extras)}"
    name = unknown[0].split("=", 1)[0]
    hint = closest(name, flags) if name.startswith("--") else None
    more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
    return f"unrecognized argument {name}" + (f" (did you mean {hint}?)" if hint else "") + more


class SuggestingParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with "did you mean" for unknown flags and one-line errors."""

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)  # for a "required" error caused by a typo
        return super().parse_known_args(args, namespace)

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            chain = self.chosen_parsers(ns)
            flags = [s for parser in chain for action in parser._actions for s in action.option_strings
                     if s.startswith("--")]
            chain[-1].error(unrecognized_message(extras, flags))
        return ns

    def chosen_parsers(self, ns: argparse.Namespace) -> list[argparse.ArgumentParser]:
        """This parser, then the subcommand parser ``ns`` chose (and its chosen one, ...)."""
        chain: list[argparse.ArgumentParser] = [self]
        while True:
            chosen = None
            for action in chain[-1]._actions:
                if isinstance(action, argparse._SubParsersAction):
                    chosen = action.choices.get(getattr(ns, action.dest, None) or "")
            if chosen is None:
                return chain
            chain.append(chosen)

    def error(self, message: str) -> NoReturn:
        if message.startswith("the following arguments are required"):
            flags = [s for action in self._actions for s in action.option_strings]
            unknown = [a for a in getattr(self, "_given", []) if a.startswith("--") and a.split("=", 1)[0] not in flags]
            if unknown:
                message = f"{message}; {unrecognized_message(unknown, flags)}"
        match = _INVALID_CHOICE.search(message)
        if match:
            choices = [c.strip().strip("'") for c in match["choices"].split(",")]
            hint = closest(match["given"], choices)
            if hint:
                message = f"{message}; did you mean {hint!r}?"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
