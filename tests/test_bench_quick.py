"""Every stage subcommand's --quick CPU form runs through the CLI and writes JSON with its keys."""
from __future__ import annotations

import json

import pytest

from benchmarks.cli import main


def _results(tmp_path, name: str) -> dict:
    return json.loads((tmp_path / f"{name}.json").read_text())["results"]


def test_buffer_quick(tmp_path):
    assert main(["buffer", "--quick", "--output", str(tmp_path)]) == 0
    r = _results(tmp_path, "buffer")
    assert r["images_per_batch"] == 16 and r["draws"] == 4 * 8  # 2 warm-up + 2 timed batches of 8 groups
    for key in ("sample_ms", "augment_ms", "step_ms"):
        assert r[key] > 0
    assert r["sample_share"] == pytest.approx(r["sample_ms"] / r["step_ms"])
    assert r["data_path_share"] == pytest.approx(r["sample_share"] + r["augment_share"])


def test_generator_quick(tmp_path):
    assert main(["generator", "--quick", "--output", str(tmp_path)]) == 0
    r = _results(tmp_path, "generator")
    assert r["config"]["backend"] == "procedural"
    assert r["paths"]["service_pool"]["images_per_second"] > 0


def test_trainer_quick(tmp_path):
    assert main(["trainer", "--quick", "--output", str(tmp_path)]) == 0
    r = _results(tmp_path, "trainer")
    assert r["images_per_step"] == 12 and r["fed_step"]["images_per_s"] > 0
    assert r["bare_step"]["eager_images_per_s"] > 0 and "fed_over_bare" in r


def test_buffer_rejects_draws_beyond_the_group():
    from benchmarks.buffer_bench import run_buffer_bench

    with pytest.raises(ValueError, match="--draw-per-caption 6 exceeds --images-per-group 4"):
        run_buffer_bench(draw_per_caption=6, images_per_group=4, device="cpu")


def test_offline_quick(tmp_path):
    assert main(["offline", "--quick", "--no-s3", "--scan", "--output", str(tmp_path)]) == 0
    r = _results(tmp_path, "offline")
    small, large = r["sizes"]["200"], r["sizes"]["2000"]
    assert small["groups"] == 200 and large["groups"] == 2000
    assert large["index_bytes_per_group"] <= 24 and "us_per_group" in large and large["first_start_unindexed_s"] > 0
    assert r["groups_per_s_one_process"]["reader_local"] > 0 and r["groups_per_s_one_process"]["webdataset_local"] > 0
