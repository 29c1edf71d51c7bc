"""The protocol benchmark runs end to end on a small group and reports consistent numbers."""
from __future__ import annotations

import json

from benchmarks.cli import main


def test_protocol_bench_writes_results(tmp_path):
    assert main(["protocol", "--shape", "2x32x32x3", "--groups", "20", "--repeats", "1",
                 "--transports", "ipc", "--output", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "protocol.json").read_text())
    methods = data["results"]["transports"]["ipc"]["methods"]
    assert set(methods) == {"protocol", "bare", "bare+copy", "pickle"}
    for run in methods.values():
        assert run["groups_per_s"] > 0
        assert abs(run["gb_per_s"] * 1e9 - run["groups_per_s"] * 2 * 32 * 32 * 3) / (run["gb_per_s"] * 1e9) < 1e-6
    assert (tmp_path / "protocol.png").stat().st_size > 0
    assert "protocol/bare" in (tmp_path / "protocol.txt").read_text()


def test_table_explains_the_methods_and_reports_the_spread_of_the_repeats(tmp_path):
    assert main(["protocol", "--shape", "2x16x16x3", "--groups", "10", "--repeats", "2", "--transports", "ipc",
                 "--output", str(tmp_path)]) == 0
    methods = json.loads((tmp_path / "protocol.json").read_text())["results"]["transports"]["ipc"]["methods"]
    for run in methods.values():
        assert len(run["runs_gb_per_s"]) == 2
        assert run["min_gb_per_s"] <= run["median_gb_per_s"] <= run["gb_per_s"] == max(run["runs_gb_per_s"])
    table = (tmp_path / "protocol.txt").read_text()
    assert "min" in table and "median" in table
    assert "bare+copy  bare plus the receiver's copy" in table and "zero-copy frame, no header" in table


def test_name_flag_sets_the_file_stem(tmp_path):
    assert main(["protocol", "--shape", "2x16x16x3", "--groups", "10", "--repeats", "1", "--transports", "ipc",
                 "--name", "proto-small", "--output", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "proto-small.json").read_text())["benchmark"] == "proto-small"
    assert not (tmp_path / "protocol.json").exists()


def test_every_run_of_all_is_a_valid_command():
    from benchmarks.cli import ALL_CUDA_RUNS, ALL_RUNS, build_parser

    parser = build_parser()
    names = []
    for argv in ALL_RUNS + ALL_CUDA_RUNS:
        args = parser.parse_args([*argv, "--output", "unused"])
        names.append(args.name or args.bench)
    assert len(set(names)) == len(names)  # no run overwrites another's results
    generator = [parser.parse_args(a) for a in ALL_CUDA_RUNS if a[0] == "generator"]
    assert {(g.scheduler, g.steps) for g in generator if g.recipe is None} == {("ddim", 50), ("dpm++", 20)}
    assert {g.recipe for g in generator if g.recipe is not None} == {"lcm4", "turbo-tiny"}
    assert all(g.model == "random:sd15" for g in generator)


def test_transport_is_the_name_and_protocol_its_alias(tmp_path):
    assert main(["transport", "--quick", "--output", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "transport.json").read_text())
    assert data["benchmark"] == "transport"
    assert set(data["results"]["transports"]["ipc"]["methods"]) == {"protocol", "bare", "bare+copy", "pickle"}
