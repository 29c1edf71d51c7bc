"""Every command a message, docstring or document names exists: a hint must not send the user to
a program (``stablerep-generate``) or subcommand that is not there."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = [*REPO.glob("*.md"), *REPO.glob("docs/**/*.md"), *REPO.glob("benchmarks/*.md"),
           *(p for d in ("protocol", "infra", "generator_service", "trainer", "experiments", "benchmarks") for p in (REPO / d).rglob("*.py"))]
PROGRAM = re.compile(r"(?<![\w/.-])(stablerep-[a-z]+)\b(?!-)")
SUBCOMMAND = re.compile(r"(?<![\w/.-])(stablerep-(?:bench|generator|eval)) ([a-z][a-z-]*)\b")


def _scripts() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


def _subcommands() -> dict[str, set[str]]:
    from benchmarks.cli import build_parser as bench_parser
    from generator_service.cli import SUBCOMMANDS
    from trainer.eval.cli import build_parser as eval_parser

    def names(parser) -> set[str]:
        return {name for action in parser._subparsers._group_actions for name in action.choices}

    return {"stablerep-bench": names(bench_parser()), "stablerep-generator": set(SUBCOMMANDS),
            "stablerep-eval": names(eval_parser())}


def test_every_named_program_is_a_console_script():
    from experiments.study import StudyPlan

    scripts = _scripts()
    arms = {arm.name.rstrip("0123456789") for arm in StudyPlan().arms()}  # "stablerep-offline": a study arm
    named = {(m.group(1), str(path.relative_to(REPO))) for path in SOURCES for m in PROGRAM.finditer(path.read_text())}
    assert len({name for name, _ in named}) >= len(scripts), "fewer names than programs: the pattern is broken"
    unknown = sorted((name, where) for name, where in named if name not in scripts | arms)
    assert not unknown, f"commands that do not exist: {unknown}"


def test_every_named_subcommand_exists():
    subcommands = _subcommands()
    # words that follow a program name in prose without being a subcommand of it
    prose = {"and", "as", "end", "flags", "running", "to", "on", "with", "or", "the", "in", "is", "also", "are",
             "itself", "runs", "over", "serves", "takes", "first", "starts", "then", "writes", "for", "reads",
             "side"}
    wrong = []
    for path in SOURCES:
        for m in SUBCOMMAND.finditer(path.read_text()):
            program, word = m.group(1), m.group(2)
            if word not in prose and word not in subcommands[program]:
                wrong.append((f"{program} {word}", str(path.relative_to(REPO))))
    assert not wrong, f"subcommands that do not exist: {sorted(set(wrong))}"
