"""Checkpoint files cannot run code: source state is JSON; a tampered legacy file is refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.checkpoint import _load_source_state, _plain


class _RunsCode:
    """Unpickling this would write a file: what a tampered checkpoint could do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "ran"))


def test_source_state_round_trips_as_plain_json(tmp_path):
    state = {"replay": {"counters": {"added": np.int64(3)}, "recent": (1, 2)}, "epoch": 2}
    (tmp_path / "source_state_0.json").write_text(json.dumps(state, default=_plain))
    assert _load_source_state(tmp_path / "source_state_0") == {
        "replay": {"counters": {"added": 3}, "recent": [1, 2]}, "epoch": 2}
    assert _load_source_state(tmp_path / "source_state_1") is None  # saved by fewer processes
    with pytest.raises(TypeError, match="does not store"):
        json.dumps({"x": object()}, default=_plain)


def test_tampered_legacy_source_state_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned.txt"
    torch.save({"replay": _RunsCode(marker)}, tmp_path / "source_state_0.pt")
    with pytest.raises(ValueError, match="refused to load"):
        _load_source_state(tmp_path / "source_state_0")
    assert not marker.exists()
    (tmp_path / "source_state_1.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable source state"):
        _load_source_state(tmp_path / "source_state_1")


def test_deeply_nested_checkpoint_json_is_refused_in_one_sentence(tmp_path):
    from trainer.checkpoint import STATE_FILE, load_checkpoint

    nested = "[" * 200_000 + "]" * 200_000
    (tmp_path / STATE_FILE).write_text(nested)
    with pytest.raises(ValueError, match=r"trainer_state.json: not a readable trainer state \(nested too deeply\)"):
        load_checkpoint(None, tmp_path)  # refused before any model state is touched
    (tmp_path / STATE_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="a JSON object expected"):
        load_checkpoint(None, tmp_path)
    (tmp_path / "source_state_0.json").write_text(nested)
    with pytest.raises(ValueError, match="not a readable source state"):
        _load_source_state(tmp_path / "source_state_0")
