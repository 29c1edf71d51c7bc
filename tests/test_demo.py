"""The embedded default end to end: generator subprocess -> ZeroMQ -> real training loop -> probes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.demo import run_demo
from experiments.demo_plan import DemoPlan, demo_trainer_config, parse_demo_args
from tests.polling import signal_when

REPO = Path(__file__).resolve().parents[1]


def test_demo_args_split_between_demo_and_trainer():
    plan, rest = parse_demo_args(["--quick", "--steps", "30", "--lr", "5e-4", "--attributes", "shape,colour"])
    assert plan.steps == 30 and plan.probe_every == 7 and plan.attributes == ("shape", "colour")
    assert rest == ["--lr", "5e-4"]
    assert parse_demo_args([])[0] == DemoPlan()


def test_demo_cells_vary_the_grammars_shape_and_texture_words(tmp_path):
    """The demo's trainer config takes its cell words from the procedural grammar; the user's
    ``--cell-words`` and a ``--config`` file's ``replay.cell_words`` rank above them."""
    from generator_service.procedural.grammar import SHAPES, TEXTURES

    endpoint, plan = "tcp://127.0.0.1:1", DemoPlan.quick()
    cfg = demo_trainer_config(plan, [], endpoint, tmp_path / "a")
    assert cfg.replay.cell_words == [*SHAPES, *TEXTURES] and cfg.replay.hard_fraction == 1.0
    assert demo_trainer_config(plan, ["--cell-words", "red", "blue"], endpoint, tmp_path / "b").replay.cell_words == [
        "red", "blue"]
    config_file = tmp_path / "mine.yaml"
    config_file.write_text("replay:\n  cell_words: [dark, light]\n")
    cfg = demo_trainer_config(plan, ["--config", str(config_file)], endpoint, tmp_path / "c")
    assert cfg.replay.cell_words == ["dark", "light"]


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
    # linear probes at init and the end, on held-out images whose seeds training never used
    assert [p["step"] for p in report["probes"]] == [0, 100]
    # the curve: the trainer's monitor, k-NN at init and every probe_every steps, read from monitor.jsonl
    knn = report["knn"]
    assert knn["every"] == plan.probe_every and knn["failures"] == 0 and set(knn["per_attribute"]) == {"colour"}
    monitored = [json.loads(line) for line in (out / "monitor.jsonl").read_text().splitlines()]
    assert [(r["step"], r["probe"]) for r in monitored] == [(0, "probe_colour"), (50, "probe_colour"), (100, "probe_colour")]
    assert knn["per_attribute"]["colour"]["steps"] == [0, 50, 100]
    assert knn["per_attribute"]["colour"]["top1"] == [r["knn_top1"] for r in monitored]
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
    from experiments.generator_process import GeneratorProcess, run_generator_cli
    from infra.free_endpoint import free_tcp_endpoint

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


def _start(args: list[str]) -> subprocess.Popen:
    """``stablerep-bench ARGS`` as a subprocess of this interpreter (stderr captured, stdout dropped)."""
    return subprocess.Popen([sys.executable, "-m", "benchmarks.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _probe_rows(out) -> int:
    try:
        return len(json.loads((out / "probes.json").read_text()))
    except (OSError, ValueError):
        return 0


def _monitored_steps(out) -> list[int]:
    try:
        return [json.loads(line)["step"] for line in (out / "monitor.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return []


def test_demo_stopped_in_training_then_in_probes_keeps_its_work_and_probes_only_finishes(tmp_path):
    out = tmp_path / "demo"
    # 1. SIGINT while training (detected by the monitor's k-NN line of step 10)
    demo = _start(["demo", "--quick", "--steps", "2000", "--probe-every", "5", "--no-progress", "--output", str(out)])
    err = signal_when(demo, lambda: 10 in _monitored_steps(out), "the monitor's evaluation at step 10", signal.SIGINT)
    assert demo.returncode == 130, err
    report = json.loads((out / "report.json").read_text())
    steps = report["steps"]
    assert report["interrupted"] is True and report["stopped_at"]["phase"] == "training"
    assert 10 <= steps < 2000 and report["total_steps"] == 2000 and len(report["losses"]) == steps
    assert report["probes"] == [] and report["probe_accuracy"] is None
    line = err.strip().splitlines()[-1]
    assert line.startswith("stablerep-bench demo: interrupted by SIGINT in the training phase (step ")
    assert f"step {steps}/2000" in line and "--probes-only" in line and "Traceback" not in err
    snapshots = sorted(int(p.name.split("-")[1]) for p in (out / "snapshots").iterdir())
    assert snapshots == [0, steps]  # the random init and the stop's checkpoint: what the linear probes score
    assert report["knn"]["per_attribute"]["colour"]["steps"][:3] == [0, 5, 10]  # the curve up to the stop

    # 2. SIGTERM while probing those snapshots (after the first probe is saved)
    probes = _start(["demo", "--probes-only", "--output", str(out)])
    err = signal_when(probes, lambda: _probe_rows(out) >= 1, "the first finished probe", signal.SIGTERM)
    assert probes.returncode == 130, err
    partial = json.loads((out / "report.json").read_text())
    kept = json.loads((out / "probes.json").read_text())
    assert partial["interrupted"] is True and partial["stopped_at"]["phase"] == "probes"
    assert partial["stopped_at"]["signal"] == "SIGTERM" and 1 <= len(kept) < len(snapshots)
    assert partial["probes"] == kept and partial["steps"] == steps  # the training part is still there
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("stablerep-bench demo: interrupted by SIGTERM in the probes phase (probe ")

    # 3. --probes-only again: the kept probes stay, the rest run, the report says the training stopped early
    assert run_demo(["--probes-only", "--output", str(out)]) == 0
    final = json.loads((out / "report.json").read_text())
    assert [p["step"] for p in final["probes"]] == snapshots
    assert final["probes"][:len(kept)] == kept  # not probed again
    assert final["interrupted"] is True and final["stopped_at"]["phase"] == "training"
    assert final["probe_accuracy"] is not None and final["per_attribute"]["colour"]["steps"] == snapshots


def test_demo_flags_are_checked_before_any_work(tmp_path, capsys):
    out = tmp_path / "demo"
    for argv, message in ((["--stpes", "5"], "unrecognized argument --stpes (did you mean --steps?) (not a flag of this command"),
                          (["--lr", "abc"], "--lr: invalid float value: 'abc'"),
                          (["--captions-per-step", "0"], "captions_per_step")):
        assert run_demo([*argv, "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
        assert err.startswith("stablerep-bench demo: error: ")
    with pytest.raises(SystemExit):
        parse_demo_args(["--attributes", "colour,smell"])
    assert "smell (known: colour" in capsys.readouterr().err
    assert not out.exists()  # nothing written: no captions, no probe sets
    assert run_demo(["--probes-only", "--output", str(out)]) == 2
    assert "holds no trained demo run" in capsys.readouterr().err
