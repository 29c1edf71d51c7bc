"""Every stage subcommand's --quick CPU form runs through the CLI and writes JSON with its keys."""
from __future__ import annotations

import json

import pytest

from benchmarks.cli import main


def _results(tmp_path, name: str) -> dict:
    return json.loads((tmp_path / f"{name}.json").read_text())["results"]


def test_buffer_rejects_draws_beyond_the_group():
    from benchmarks.buffer_bench import run_buffer_bench

    with pytest.raises(ValueError, match="--draw-per-caption 6 exceeds --images-per-group 4"):
        run_buffer_bench(draw_per_caption=6, images_per_group=4, device="cpu")


def test_quick_tables_say_they_test_the_code_path_not_the_speed(tmp_path, capsys):
    from benchmarks.results_writer import QUICK_NOTE

    assert main(["transport", "--quick", "--output", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(QUICK_NOTE)
    assert (tmp_path / "transport.txt").read_text().splitlines()[0] == QUICK_NOTE
    assert json.loads((tmp_path / "transport.json").read_text())["quick"] is True
    assert main(["transport", "--groups", "20", "--shape", "2x32x32x3", "--repeats", "1", "--transports", "ipc",
                 "--output", str(tmp_path)]) == 0
    assert QUICK_NOTE not in capsys.readouterr().out  # a measurement carries no such line
    assert json.loads((tmp_path / "transport.json").read_text())["quick"] is False


def test_drills_quick_attacks_a_live_service(tmp_path):
    from benchmarks.drills import ATTACKS

    assert main(["drills", "--quick", "--attacks", "garbage", "hoarders", "--output", str(tmp_path)]) == 0
    r = _results(tmp_path, "drills")
    assert set(r["attacks"]) == {"garbage", "hoarders"} and set(ATTACKS) >= set(r["attacks"])
    for attack in r["attacks"].values():
        assert attack["before_groups_per_s"] > 0 and attack["service_alive"] is True
    assert (tmp_path / "drills.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_all_quick_runs_the_quick_form_of_every_stage_all_runs(tmp_path):
    """One run covers every stage's --quick form (each stage's own checks below)."""
    from benchmarks.cli import quick_runs

    runs = quick_runs()
    assert [r[0] for r in runs] == ["transport", "flops", "generator", "generator-sweep", "trainer", "buffer"]
    assert main(["all", "--quick", "--output", str(tmp_path)]) == 0
    for stage, _ in runs:
        data = json.loads((tmp_path / f"{stage}.json").read_text())
        assert data["quick"] is True and data["results"], stage

    r = _results(tmp_path, "buffer")
    assert r["images_per_batch"] == 16 and r["draws"] == 4 * 8  # 2 warm-up + 2 timed batches of 8 groups
    for key in ("sample_ms", "augment_ms", "step_ms"):
        assert r[key] > 0
    assert r["sample_share"] == pytest.approx(r["sample_ms"] / r["step_ms"])
    assert r["data_path_share"] == pytest.approx(r["sample_share"] + r["augment_share"])

    r = _results(tmp_path, "generator")
    assert r["config"]["backend"] == "procedural"
    assert r["paths"]["service_pool"]["images_per_second"] > 0

    r = _results(tmp_path, "trainer")
    assert r["images_per_step"] == 12 and r["fed_step"]["images_per_s"] > 0
    assert r["bare_step"]["eager_images_per_s"] > 0 and "fed_over_bare" in r

    rows = _results(tmp_path, "generator-sweep")  # without --model: its own tiny random pipeline
    assert (tmp_path / "tiny-sd-pipeline" / "model_index.json").is_file()
    assert {row["detail"]["config"]["model"] for row in rows} == {str(tmp_path / "tiny-sd-pipeline")}
    assert all(row["service_pool"] > 0 for row in rows)


def test_bar_plots_use_a_log_axis_across_decades_and_say_so_for_tiny_values():
    from benchmarks.results_writer import bar_label, spans_decades

    assert spans_decades([31.7, 179264.0]) and not spans_decades([31.7, 95.0]) and not spans_decades([0.0, 5.0])
    assert bar_label(1.22e-09, 0.4) == "~0" and bar_label(0.4, 0.4) == "0.4" and bar_label(0.0, 0.4) == "0"
    assert bar_label(1234.5, 1234.5) == "1.23e+03"


def test_offline_quick(tmp_path):
    assert main(["offline", "--quick", "--no-s3", "--scan", "--output", str(tmp_path)]) == 0
    r = _results(tmp_path, "offline")
    small, large = r["sizes"]["200"], r["sizes"]["2000"]
    assert small["groups"] == 200 and large["groups"] == 2000
    assert large["index_bytes_per_group"] <= 24 and "us_per_group" in large and large["first_start_unindexed_s"] > 0
    rates = r["read_sets"]["2x16"]["groups_per_s"]
    assert rates["reader_local"] > 0 and rates["webdataset_local"] > 0 and r["read_sets"]["2x16"]["ratios"]["local"] > 0
    assert r["read_sets"]["2x16"]["cpu_ms_per_group"]["reader_local"] > 0


def test_augment_quick(tmp_path, capsys):
    assert main(["augment", "--quick", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "augment.json").read_text())["results"]
    assert results["batch"] == 16 and results["images_per_s"] > 0 and results["goal_images_per_s"] == 30_000
    assert main(["augment", "--batch", "0", "--output", str(tmp_path)]) == 2
    assert "--batch must be >= 1, got 0" in capsys.readouterr().err


def test_monitor_quick_times_evaluations_against_training_in_one_run(tmp_path):
    assert main(["monitor", "--quick", "--max-images", "8", "0", "--output", str(tmp_path)]) == 0
    r = _results(tmp_path, "monitor")
    assert r["steps"] == 4 and r["every"] == 2 and [run["max_images"] for run in r["runs"]] == [8, 0]
    subset, whole = r["runs"]
    assert subset["images_per_evaluation"] == 16 and whole["images_per_evaluation"] == 8 * 8 + 8 * 4  # 8 colours
    for run in r["runs"]:
        assert run["first_eval_s"] >= run["decode_s"] > 0 and len(run["eval_s_each"]) == 2
        assert run["eval_share"] == pytest.approx(run["eval_s"] / run["train_s_per_interval"])
        assert set(run["demo_share"]) == {"250", "500", "1000"}
        assert set(run["knn_top1_last"]) == {"probe_colour"}
    assert (tmp_path / "monitor.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
