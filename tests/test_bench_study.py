"""``stablerep-bench study --quick``: every arm really trains (generator subprocess or shards) and is probed."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.study import StudyArm, StudyPlan, parse_study_args, run_study
from tests.polling import signal_when

REPO = Path(__file__).resolve().parents[1]

ARM_KEYS = {"name", "method", "source", "max_reuse", "seed", "steps", "images_seen", "probe", "fewshot"}


def test_study_args_split_between_study_and_trainer(tmp_path):
    plan, rest = parse_study_args(["--quick", "--seeds", "2", "--reuses", "1", "8", "--lr", "5e-4",
                                   "--generator-args", "--steps 4 --recipe paper"])
    assert plan.seeds == 2 and plan.reuses == (1, 8) and plan.steps == StudyPlan.quick().steps
    assert plan.generator_args == ["--steps", "4", "--recipe", "paper"]
    assert rest == ["--lr", "5e-4"]
    names = [arm.name for arm in plan.arms()]
    assert names == ["stablerep", "simclr", "clip", "stablerep-offline", "stablerep-reuse1", "stablerep-reuse8"]
    assert plan.arms()[-1] == StudyArm("stablerep-reuse8", "stablerep", "online", 8)
    with pytest.raises(SystemExit):
        parse_study_args(["--probe", f"shape={tmp_path}"])  # no train/ and val/ there


def _arms_done(path) -> int:
    try:
        return len(json.loads(path.read_text())["arms"])
    except (OSError, ValueError, KeyError):
        return 0


def test_study_flags_are_checked_before_any_work_and_resume_needs_the_same_plan(tmp_path, capsys):
    out = tmp_path / "study"
    assert run_study(["--quick", "--stpes", "3", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unrecognized argument --stpes (did you mean --steps?)" in err, err
    assert err.startswith("stablerep-bench study: error: ")
    assert not out.exists()
    assert run_study(["--quick", "--resume", "--output", str(out)]) == 2
    assert "no earlier study" in capsys.readouterr().err
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"plan": {"steps": 99}, "trainer_flags": [], "arms": []}))
    assert run_study(["--quick", "--resume", "--output", str(out)]) == 2
    assert "has steps=99, this one 6" in capsys.readouterr().err


def test_quick_study_stopped_then_resumed_runs_every_arm_and_writes_json_table_and_plot(tmp_path):
    out = tmp_path / "study"
    argv = ["--quick", "--output", str(out), "--no-progress"]
    # stopped by SIGINT once the first arm is in study.json (polled, not timed)
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.cli", "study", *argv], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = signal_when(proc, lambda: _arms_done(out / "study.json") >= 1, "the first arm", signal.SIGINT)
    assert proc.returncode == 130, err
    stopped = json.loads((out / "study.json").read_text())
    kept = stopped["arms"]
    assert stopped["interrupted"] is True and stopped["stopped_at"]["phase"] in ("arms", "random init")
    assert 1 <= len(kept) < len(StudyPlan.quick().arms())
    line = err.strip().splitlines()[-1]
    assert line.startswith("stablerep-bench study: interrupted by SIGINT in the arms phase (arm ") and "--resume" in line
    assert "Traceback" not in err

    assert run_study([*argv, "--resume"]) == 0  # only the arms not finished run
    study = json.loads((out / "study.json").read_text())
    assert study["arms"][:len(kept)] == kept and study["interrupted"] is False
    plan = StudyPlan.quick()
    arms = study["arms"]
    assert [a["name"] for a in arms] == [arm.name for arm in plan.arms()]
    for arm in arms:
        assert ARM_KEYS <= set(arm), arm
        assert arm["steps"] == plan.steps
        # the same 64 drawn images per step in every arm; images_seen counts the views in the loss (SimCLR: 2 crops)
        assert arm["images_seen"] == plan.steps * 64 * (2 if arm["method"] == "simclr" else 1)
        assert set(arm["probe"]) == {"colour"} and 0.0 <= arm["probe"]["colour"] <= 100.0
        assert 0.0 <= arm["fewshot"]["accuracy"] <= 100.0
    by_name = {a["name"]: a for a in arms}
    assert by_name["simclr"]["captions_per_step"] == 64 and by_name["stablerep"]["draw_per_caption"] == 4
    assert by_name["stablerep-offline"]["source"] == "offline"
    assert by_name["stablerep-offline"]["offline_groups"] == -(-plan.steps * 16 // 9)
    assert by_name["stablerep-reuse1"]["max_reuse"] == 1 and by_name["stablerep-reuse1"]["mean_reuse"] <= 1.0
    assert study["random_init"][0]["seed"] == 0 and "colour" in study["random_init"][0]["probe"]
    assert (out / "study.png").stat().st_size > 0
    table = (out / "study.txt").read_text()
    assert "random init" in table and "stablerep-offline" in table
