"""The embedded default end to end: generator subprocess -> ZeroMQ -> real training loop -> probes."""
from __future__ import annotations

import json
import os

import pytest

from benchmarks.demo import DemoPlan, parse_demo_args, run_demo


def test_demo_args_split_between_demo_and_trainer():
    plan, rest = parse_demo_args(["--quick", "--steps", "30", "--lr", "5e-4", "--attributes", "shape,colour"])
    assert plan.steps == 30 and plan.probe_every == 7 and plan.attributes == ("shape", "colour")
    assert rest == ["--lr", "5e-4"]
    assert parse_demo_args([])[0] == DemoPlan()


def test_quick_demo_learns_beyond_random_init(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_demo(["--quick", "--no-progress"], str(out)) == 0
    report = json.loads((out / "report.json").read_text())

    plan = DemoPlan.quick()
    assert report["steps"] == plan.steps
    assert report["images_seen"] == plan.steps * 16 * 4
    assert report["generated_groups"] >= 16  # groups really arrived over ZeroMQ
    assert report["train_images_per_s"] > 0
    assert report["loss_last_mean"] < report["loss_first_mean"]
    assert report["loss_first"] == report["losses"][0] and report["loss_last"] == report["losses"][-1]
    # probes at init, mid-run and the end, on held-out images whose seeds training never used
    assert [p["step"] for p in report["probes"]] == [0, 50, 100]
    assert report["probe_attribute"] == "colour" and report["num_classes"] == 8
    assert set(report["per_attribute"]) == set(plan.attributes)  # every probed attribute is reported
    # a real learning signal: the trained backbone clearly beats the same architecture at init
    assert report["probe_accuracy"] >= report["random_init_probe_accuracy"] + 5.0, report["per_attribute"]
    assert report["probe_accuracy"] > 90.0

    few = report["fewshot"]
    assert few["trained"]["step"] == 100 and few["random_init"]["step"] == 0
    assert few["trained"]["accuracy"] > few["random_init"]["accuracy"]

    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "backbone.safetensors").is_file() and (out / "config.yaml").is_file()
    assert report["generator"]["exit_status"] is not None  # the generator subprocess was stopped and reaped
    with pytest.raises(ProcessLookupError):
        os.kill(report["generator"]["pid"], 0)
    printed = capsys.readouterr().out
    assert "random init" in printed and "probe accuracy" in printed


def test_generator_process_is_always_stopped(tmp_path):
    from benchmarks.demo import GeneratorProcess, free_tcp_endpoint, run_generator_cli

    captions = tmp_path / "captions.txt"
    run_generator_cli(["captions", "--n", "8", "--out", str(captions)])
    args = ["--captions", str(captions), "--gpus", "cpu:1", "--bind", free_tcp_endpoint(), "--drain-timeout", "2"]
    with pytest.raises(RuntimeError, match="boom"):
        with GeneratorProcess(args, log_path=tmp_path / "gen.log") as gen:
            raise RuntimeError("boom")  # a failure while training must not leave the service running
    assert gen.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(gen.pid, 0)

    with GeneratorProcess(["--captions", str(tmp_path / "missing.txt"), "--bind", free_tcp_endpoint()],
                          log_path=tmp_path / "bad.log") as bad:
        bad.proc.wait(60)
        with pytest.raises(RuntimeError, match="missing.txt"):
            bad.check_alive()
