"""benchmarks/generator_sweep.py on the CPU: ``--quick`` over the tiny pipeline (tests/tiny_sd.py), for real."""
from __future__ import annotations

import json

import pytest

from benchmarks.cli import build_parser, main
from benchmarks.generator_sweep import PATHS, QUICK
from benchmarks.results_writer import QUICK_NOTE

ROW_KEYS = {"steps", "size", *PATHS, "speedup", "speedup_backend", "detail"}


def test_quick_sweep_writes_one_row_per_grid_point_and_a_plot(tiny_sd_path, tmp_path, capsys):
    assert main(["generator-sweep", "--quick", "--model", str(tiny_sd_path), "--output", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "generator-sweep.json").read_text())
    assert data["benchmark"] == "generator-sweep" and "machine" in data
    rows = data["results"]
    assert [(row["steps"], row["size"]) for row in rows] == [(s, w) for s in QUICK["steps_list"] for w in QUICK["sizes"]]
    for row in rows:
        assert set(row) == ROW_KEYS
        assert all(row[name] > 0 for name in PATHS)
        assert row["speedup"] == row["service_pool"] / row["diffusers_eager"]
        assert row["speedup_backend"] == row["service_backend"] / row["diffusers_eager"]
        config = row["detail"]["config"]
        assert (config["model"], config["steps"], config["height"], config["width"]) == (
            str(tiny_sd_path), row["steps"], row["size"], row["size"])
    assert (tmp_path / "generator-sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "generator-sweep.txt").read_text()
    assert len(table.splitlines()) == 3 + len(rows) and "pool/eager" in table
    assert table.splitlines()[0] == QUICK_NOTE  # a --quick table says it tests the code path, not the speed
    assert table.strip() in capsys.readouterr().out


def test_grid_flags_parse_and_the_swept_generator_flags_are_not_taken(capsys):
    args = build_parser().parse_args(["generator-sweep", "--steps-list", "5,10,20", "--sizes", "64,128",
                                      "--model", "m", "--guidance", "2", "--worker-batch", "4"])
    assert (args.steps_list, args.sizes, args.model, args.guidance, args.worker_batch) == ((5, 10, 20), (64, 128), "m", 2.0, 4)
    for bad in (["--height", "64"], ["--width", "64"], ["--sizes", "0"], ["--steps-list", "a"]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["generator-sweep", *bad])
        assert exc.value.code == 2
    capsys.readouterr()


def test_the_procedural_backend_is_refused(tmp_path, capsys):
    assert main(["generator-sweep", "--backend", "procedural", "--output", str(tmp_path)]) == 2
    assert "--backend must be diffusers" in capsys.readouterr().err
    assert not (tmp_path / "generator-sweep.json").exists()
