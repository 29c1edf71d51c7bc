"""``stablerep-bench study --quick``: every arm really trains (generator subprocess or shards) and is probed."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.study import StudyArm, StudyPlan, parse_study_args, run_study
from experiments.study_curve import curve_every
from experiments.study_loop import hard_weights
from generator_service.caption_policy import DEFAULT_HARD_ALPHA, DEFAULT_HARD_FLOOR
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


def test_closed_loop_arms_and_arm_selection_are_parsed():
    plan, rest = parse_study_args(["--quick", "--closed-loop", "--arms", "online-hard", "stablerep-offline",
                                   "--loop-image-rate", "8", "--loop-feedback-every", "5"])
    assert [arm.name for arm in plan.arms()] == ["stablerep-offline", "online-hard"]
    assert plan.arms()[1] == StudyArm("online-hard", "stablerep", "online", policy="hard")
    assert plan.loop_image_rate == 8.0 and plan.feedback_every == 5 and rest == []
    assert "online-uniform" in [arm.name for arm in plan.all_arms()]
    with pytest.raises(SystemExit):
        parse_study_args(["--quick", "--arms", "online-hard"])  # a closed-loop arm without --closed-loop
    with pytest.raises(SystemExit):
        parse_study_args(["--quick", "--closed-loop", "--loop-feedback-every", "0"])


def test_the_sharp_arm_runs_only_when_named_and_the_hard_weights_are_study_flags(capsys):
    plan, _ = parse_study_args(["--quick", "--closed-loop"])
    assert [arm.name for arm in plan.arms()][-2:] == ["online-uniform", "online-hard"]  # today's three loop arms
    assert (plan.hard_floor, plan.hard_alpha) == (DEFAULT_HARD_FLOOR, DEFAULT_HARD_ALPHA)
    assert (plan.sharp_floor, plan.sharp_alpha) == (0.0, 4.0)
    assert hard_weights(plan, "online-hard") == (1.0, 1.0) and hard_weights(plan, "online-hard-sharp") == (0.0, 4.0)
    plan, _ = parse_study_args(["--quick", "--closed-loop", "--arms", "online-hard", "online-hard-sharp",
                                "--hard-floor", "0.5", "--hard-alpha", "2", "--sharp-alpha", "8"])
    assert plan.arms()[-1] == StudyArm("online-hard-sharp", "stablerep", "online", policy="hard")
    assert hard_weights(plan, "online-hard") == (0.5, 2.0) and hard_weights(plan, "online-hard-sharp") == (0.0, 8.0)
    assert plan.curve(plan.arms()[0]) and not plan.curve(StudyArm("stablerep", "stablerep", "online"))
    for flags, message in ((["--hard-floor", "-1"], "--hard-floor must be a finite number >= 0, got -1.0"),
                           (["--sharp-alpha", "0"], "--sharp-alpha must be a finite number > 0, got 0.0")):
        with pytest.raises(SystemExit) as exit_info:
            parse_study_args(["--quick", "--closed-loop", *flags])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_closed_loop_curve_arms_record_knn_against_groups_received_and_plot_it(tmp_path):
    out = tmp_path / "study"
    assert run_study(["--quick", "--closed-loop", "--arms", "stablerep-offline", "online-hard-sharp",
                      "--output", str(out), "--no-progress"]) == 0
    study = json.loads((out / "study.json").read_text())
    plan = StudyPlan.quick()
    every = curve_every(plan.steps)
    by_name = {a["name"]: a for a in study["arms"]}
    assert by_name["online-hard-sharp"]["hard_floor"] == 0.0 and by_name["online-hard-sharp"]["hard_alpha"] == 4.0
    for name, arm in by_name.items():
        curve = arm["curve"]
        assert [p["step"] for p in curve] == list(range(0, plan.steps + 1, every))
        received = [p["groups_received"] for p in curve]
        assert received == sorted(received) and received[-1] > 0, (name, received)
        assert all(0.0 <= p["knn"]["colour"] <= 100.0 for p in curve)
        assert curve[-1]["knn"]["colour"] == arm["knn"]["colour"]  # the monitor's last reading
        summary = study["summary"][name]["curve"]
        assert [p["step"] for p in summary] == [p["step"] for p in curve]
        assert summary[-1]["groups_received"]["mean"] == received[-1] and summary[-1]["knn"]["colour"]["n"] == 1
    offline = by_name["stablerep-offline"]  # its K groups, read again and again: K distinct ones
    assert offline["curve"][0]["groups_received"] == 0 and offline["curve"][-1]["groups_received"] == offline["offline_groups"]
    assert study["summary"]["random init"]["curve"] is None
    assert (out / "study-curve.png").stat().st_size > 0
    assert "k-NN top-1 of the monitor against groups received" in (out / "study.txt").read_text()


def test_quick_closed_loop_study_steers_the_hard_arm_by_feedback_and_reads_diversity(tmp_path):
    out = tmp_path / "study"
    assert run_study(["--quick", "--closed-loop", "--seeds", "2", "--arms", "online-uniform", "online-hard",
                      "--output", str(out), "--no-progress"]) == 0
    study = json.loads((out / "study.json").read_text())
    plan = StudyPlan.quick()
    arms = study["arms"]
    assert [(a["name"], a["seed"]) for a in arms] == [("online-uniform", 0), ("online-hard", 0),
                                                      ("online-uniform", 1), ("online-hard", 1)]
    for arm in arms:
        assert arm["policy"] == arm["name"].split("-")[1] and arm["steps"] == plan.steps
        assert arm["images_seen"] == plan.steps * 64 and arm["drawn"]["groups"] == plan.steps * 16
        assert arm["groups_received"] >= 16 and arm["groups_generated"] >= arm["groups_received"]
        assert 0.0 <= arm["drawn"]["gini"] < 1.0 and 0.0 <= arm["generated"]["gini"] < 1.0
        assert arm["generated"]["groups"] >= arm["groups_received"]  # per caption, what the generator handed out
        assert 0.0 <= arm["knn"]["colour"] <= 100.0  # the trainer's k-NN monitor at the last step
        assert set(arm["knn_per_class"]["colour"]) == {"red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"}
        counts = json.loads((out / f"{arm['name']}-seed{arm['seed']}" / "caption_counts.json").read_text())
        assert sum(counts["drawn"].values()) == plan.steps * 16
        if arm["policy"] == "hard":  # the trainer reported caption losses and the generator merged them
            assert arm["feedback_sent_messages"] >= 1 and arm["feedback_sent_entries"] >= 1
            assert arm["feedback_merged"] >= 1
        else:
            assert arm["feedback_sent_messages"] == 0 and arm["feedback_merged"] == 0
    hard = study["summary"]["online-hard"]
    assert hard["seeds"] == [0, 1] and hard["probe"]["colour"]["n"] == 2 and hard["probe"]["colour"]["std"] is not None
    assert study["summary"]["random init"]["probe"]["colour"]["n"] == 2
    loop = study["closed_loop"]
    assert [len(s["ignored"]["colour"]) for s in loop["per_seed"]] == [2, 2]  # the quarter of 8 colours fed least
    assert all(0.0 < s["random_draw_gini"] < 1.0 for s in loop["per_seed"])  # as many groups drawn at random
    assert set(loop["mean"]) == {"online-uniform", "online-hard"}
    assert "online-hard" in (out / "study.txt").read_text()
