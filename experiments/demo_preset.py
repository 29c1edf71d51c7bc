"""The trainer settings the demo and the study start from: the ``demo`` preset
(trainer/presets/demo.yaml) and the caption-cell words, which are the procedural grammar's.

The preset cannot hold the words without copying them: they belong to the generator's caption
grammar (generator_service/procedural/grammar.py), and the trainer never imports the generator
service. So the commands that pair the two (``stablerep-bench demo``, ``study``) pass them as
``--cell-words`` right after the preset, before the user's trainer flags (which may override them).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from generator_service.procedural.grammar import SHAPES, TEXTURES

DEMO_PRESET = "demo"


def demo_cell_words() -> tuple[str, ...]:
    """The words a caption cell of the demo may vary: the grammar's shape and texture words, so the
    captions of a cell differ from its anchor only in the shape or only in the texture."""
    return (*SHAPES, *TEXTURES)


def demo_trainer_flags(trainer_argv: Sequence[str] = ()) -> list[str]:
    """``--preset demo --cell-words ...``: the first trainer flags of every demo and study run.

    The words stay out when the user's ``--config FILE`` (in ``trainer_argv``) sets
    ``replay.cell_words``: a config file ranks above the preset, where the words belong.
    """
    flags = ["--preset", DEMO_PRESET]
    if not _config_file_sets_cell_words(trainer_argv):
        flags += ["--cell-words", *demo_cell_words()]
    return flags


def _config_file_sets_cell_words(trainer_argv: Sequence[str]) -> bool:
    import yaml

    path = None
    for i, arg in enumerate(trainer_argv):
        if arg == "--config" and i + 1 < len(trainer_argv):
            path = trainer_argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    if path is None:
        return False
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False  # the trainer's own parse reports the file
    replay = data.get("replay") if isinstance(data, dict) else None
    return isinstance(replay, dict) and "cell_words" in replay
