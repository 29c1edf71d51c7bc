"""stablerep-bench plan: the capacity arithmetic against hand-computed cases, and its JSON inputs."""
from __future__ import annotations

import json

import pytest

from benchmarks.cli import main
from benchmarks.plan import plan, rates_from_json


def test_hand_computed_ratio_and_stall():
    # trainer 900 img/s, generator 10 img/s, reuse 9: 900 / (9 * 10) = 10 generator GPUs per trainer GPU
    result = plan(generator_rate=10.0, trainer_rate=900.0, reuse=9.0, ratios=[5.0, 10.0, 20.0], reuses=[3.0, 9.0])
    assert result["generators_per_trainer"] == pytest.approx(10.0)
    assert result["generator_gpus"] == 10
    assert result["fresh_images_per_s_needed"] == pytest.approx(100.0)
    by_ratio = {row["generators_per_trainer"]: row for row in result["by_ratio"]}
    # 5 generators: supply 5 * 10 * 9 = 450 of 900 -> half the time stalled, no surplus
    assert by_ratio[5.0]["trainer_stall_fraction"] == pytest.approx(0.5)
    assert by_ratio[5.0]["generator_surplus_fraction"] == 0.0
    assert by_ratio[5.0]["trainer_images_per_s"] == pytest.approx(450.0)
    assert by_ratio[10.0]["trainer_stall_fraction"] == pytest.approx(0.0)
    # 20 generators: 1800 supplied for 900 drawn -> half the output surplus
    assert by_ratio[20.0]["generator_surplus_fraction"] == pytest.approx(0.5)
    by_reuse = {row["reuse"]: row for row in result["by_reuse"]}
    # at 10 generators with reuse 3: 300 of 900 -> two thirds stalled
    assert by_reuse[3.0]["trainer_stall_fraction"] == pytest.approx(2 / 3)


def test_generator_gpus_round_up_over_trainer_gpus():
    # 2542 / (9 * 3.1) = 91.11 per trainer GPU; 8 trainer GPUs -> 728.9 -> 729
    result = plan(generator_rate=3.1, trainer_rate=2542.0, reuse=9.0, trainer_gpus=8)
    assert result["generators_per_trainer"] == pytest.approx(2542 / 27.9)
    assert result["generator_gpus"] == 729


def test_bad_rates_are_named():
    with pytest.raises(ValueError, match="generator rate"):
        plan(generator_rate=0.0, trainer_rate=1.0)
    with pytest.raises(ValueError, match="reuse"):
        plan(generator_rate=1.0, trainer_rate=1.0, reuse=float("nan"))


def test_rates_from_online_json_correct_for_stall_and_idle(tmp_path):
    online = {"benchmark": "online", "results": {
        "trainer_images_per_s": 80.0, "trainer_stall_fraction": 0.2, "generated_images_per_s": 30.0,
        "generator_idle_fraction": 0.25, "generators": 2}}
    path = tmp_path / "online.json"
    path.write_text(json.dumps(online))
    rates = rates_from_json(path)
    assert rates["trainer_rate"] == pytest.approx(100.0)  # 80 / (1 - 0.2)
    assert rates["generator_rate"] == pytest.approx(20.0)  # 30 / (2 * (1 - 0.25))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"benchmark": "x", "results": {"speed": 1}}))
    with pytest.raises(ValueError, match="bad.json"):
        rates_from_json(bad)


def test_quick_cli_and_from_flags(tmp_path):
    assert main(["plan", "--quick", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "plan.json").read_text())["results"]
    for key in ("generators_per_trainer", "generator_gpus", "by_ratio", "by_reuse"):
        assert key in results
    assert results["generator_gpus"] == 92
    assert main(["plan", "--generator-rate", "2", "--trainer-rate", "36", "--reuse", "3", "--name", "p2",
                 "--output", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "p2.json").read_text())["results"]["generators_per_trainer"] == pytest.approx(6.0)
