"""The k-NN monitor of a training run (trainer/monitor.py): real short offline runs of a small CNN on real
shards, probed on real ImageFolders; ``stablerep-eval knn`` on the exported backbone; bad probe folders."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.eval_helpers import write_colour_folder
from tests.test_train_launch import REPO, env, launcher
from tests.train_helpers import scrape_metrics, write_shards
from trainer import cli
from trainer.eval.cli import main as eval_main
from trainer.live_metrics import TrainerMetrics

COLOURS = ("red", "blue", "green")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), num_captions=32, m=4, size=32, groups_per_shard=16)


def probe_folder(root: Path, classes=COLOURS, train_per_class: int = 10, val_per_class: int = 5) -> Path:
    write_colour_folder(root / "train", per_class=train_per_class, seed=0, classes=classes)
    write_colour_folder(root / "val", per_class=val_per_class, seed=1, classes=classes)
    return root


def mixed_label(colour: str, i: int) -> str:
    """Labels that only partly follow colour, so k-NN lands between chance and 100 %."""
    return "a" if (colour == "red" and i % 5 != 0) or (colour == "green" and i % 2 == 0) else "b"


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """``colours``: a healthy probe with one corrupt val image; ``unreadable``: val images all corrupt;
    ``mixed``: labels that only partly follow colour."""
    base = tmp_path_factory.mktemp("probes")
    colours = probe_folder(base / "colours")
    (colours / "val" / "red" / "broken.png").write_bytes(b"not a png")
    unreadable = probe_folder(base / "unreadable", classes=("red", "blue"), val_per_class=1)
    for path in (unreadable / "val").rglob("*.png"):
        path.write_bytes(b"truncated")
    mixed = base / "mixed"
    write_colour_folder(mixed / "train", per_class=10, seed=2, classes=COLOURS, label_of=mixed_label)
    write_colour_folder(mixed / "val", per_class=10, seed=3, classes=COLOURS, label_of=mixed_label)
    return colours, unreadable, mixed


def args(shards: Path, output: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--preset", "demo", "--source", "offline", "--data", str(shards), "--output", str(output),
        "--img-size", "32", "--image-size", "32", "--head-hidden", "32", "--head-out", "16",
        "--captions-per-step", "8", "--draw-per-caption", "2", "--steps", str(steps), "--warmup-steps", "1",
        "--log-with", "--num-workers", "0", "--no-progress", *extra,
    ]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "monitor.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def monitored_run(shards, probes, tmp_path_factory):
    colours, unreadable, mixed = probes
    out = tmp_path_factory.mktemp("monitored") / "run"
    code = cli.main(args(shards, out, 4, "--monitor", str(colours), str(unreadable), str(mixed), "--monitor-every", "2",
                         "--monitor-linear", "--log-with", "tensorboard"))
    assert code == 0
    return out


def test_a_run_with_monitor_evaluates_steps_0_n_2n_and_keeps_training_past_a_failing_probe(monitored_run):
    rows = records(monitored_run)
    good = [r for r in rows if r["probe"] == "colours"]
    assert [r["step"] for r in good] == [0, 2, 4]
    assert [r["images_seen"] for r in good] == [0, 32, 64]
    for row in good:
        assert 0.0 <= row["knn_top1"] <= 100.0 and 0.0 <= row["linear_top1"] <= 100.0
        assert row["skipped_images"] == 1 and row["val_images"] == 15 and row["train_images"] == 30
        assert row["num_classes"] == 3 and row["seconds"] > 0
    bad = [r for r in rows if r["probe"] == "unreadable"]
    assert [r["step"] for r in bad] == [0, 2, 4]
    assert all("no decodable image" in r["error"] and "knn_top1" not in r for r in bad)

    summary = json.loads((monitored_run / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["stopped"] == "completed"
    monitor = summary["monitor"]
    assert monitor["evaluations"] == 3 and monitor["failures"] == 3 and monitor["knn_k"] == 20
    assert monitor["last"]["colours"]["step"] == 4 and monitor["last"]["colours"]["knn_top1"] == good[-1]["knn_top1"]
    log = (monitored_run / "train.log").read_text()
    assert log.count("monitor step ") == 3
    assert f"monitor step 4: knn colours {good[-1]['knn_top1']:.1f} linear" in log and "unreadable failed" in log
    events = EventAccumulator(str(next(monitored_run.glob("stablerep/**/events.out.tfevents.*")).parent))
    events.Reload()
    knn = [(e.step, e.value) for e in events.Scalars("monitor/colours/knn_top1")]
    assert knn == [(r["step"], pytest.approx(r["knn_top1"])) for r in good]
    assert "monitor/mixed/linear_top1" in events.Tags()["scalars"]
    with Image.open(monitored_run / "curve.png") as curve:
        assert curve.width == 1320  # two panels (loss | accuracy); the loss panel alone is 770 px wide


def test_monitor_rows_count_the_distinct_groups_the_source_has_handed_out(monitored_run):
    """Offline: 32 groups in the shards, 8 drawn per step; a step's row counts at least the groups its
    steps trained on, never more than the data set holds, and never goes down."""
    for probe in ("colours", "unreadable", "mixed"):
        rows = [r for r in records(monitored_run) if r["probe"] == probe]
        received = [r["groups_received"] for r in rows]
        assert received[0] == 0  # the random init: before the source exists
        assert received == sorted(received) and received[-1] == 32  # the last step read the whole first epoch
        for row in rows[1:]:
            assert 8 * row["step"] <= row["groups_received"] <= 32


@pytest.mark.parametrize("probe", ["colours", "mixed"])
def test_eval_knn_on_the_exported_backbone_agrees_with_the_monitors_last_evaluation(probe, monitored_run, probes,
                                                                                  tmp_path):
    folder = {p.name: p for p in probes}[probe]
    out = tmp_path / "knn.json"
    code = eval_main(["knn", "--checkpoint", str(monitored_run), "--train", str(folder / "train"),
                      "--val", str(folder / "val"), "--workers", "0", "--device", "cpu", "--output", str(out)])
    assert code == 0
    standalone = json.loads(out.read_text())
    last = [r for r in records(monitored_run) if r["probe"] == probe][-1]
    assert last["step"] == 4 and standalone["skipped_images"] == last["skipped_images"]
    assert abs(standalone["top1"] - last["knn_top1"]) <= 0.5
    if probe == "mixed":  # not a saturated probe: the agreement is on a number that could differ
        assert 50 < last["knn_top1"] < 100


def test_max_images_scores_the_same_class_balanced_subset_at_every_evaluation_and_in_every_run(
        shards, probes, tmp_path):
    """``--monitor-max-images 10`` on a probe of 2 classes x 13-17 images per split: 5 per class, the same
    files at every step and in a second run, and ``stablerep-eval knn`` on exactly those files agrees with
    the monitor's last evaluation. (The probes of the other tests are below the default of 512 per split:
    they are scored whole.)"""
    mixed = probes[2]
    listed = []
    for name in ("first", "second"):
        out = tmp_path / name
        assert cli.main(args(shards, out, 2, "--monitor", str(mixed), "--monitor-every", "1",
                             "--monitor-max-images", "10")) == 0
        rows = records(out)
        assert [r["step"] for r in rows] == [0, 1, 2]
        for row in rows:
            assert (row["train_images"], row["val_images"], row["train_files"], row["val_files"]) == (10, 10, 30, 30)
        summary = json.loads((out / "train_summary.json").read_text())["monitor"]
        assert summary["max_train"] == summary["max_val"] == 10 and [t["step"] for t in summary["timeline"]] == [0, 1, 2]
        listed.append(json.loads((out / "monitor_images.json").read_text())["mixed"])
    assert listed[0] == listed[1]  # the same subset in every run on the same folder
    for split in ("train", "val"):
        assert sorted(Path(p).parent.name for p in listed[0][split]) == ["a"] * 5 + ["b"] * 5

    subset = tmp_path / "subset"  # the monitor's images as folders, scored by the standalone evaluation
    for split in ("train", "val"):
        for path in map(Path, listed[0][split]):
            (subset / split / path.parent.name).mkdir(parents=True, exist_ok=True)
            (subset / split / path.parent.name / path.name).write_bytes(path.read_bytes())
    result = tmp_path / "knn.json"
    assert eval_main(["knn", "--checkpoint", str(tmp_path / "second"), "--train", str(subset / "train"),
                      "--val", str(subset / "val"), "--workers", "0", "--device", "cpu", "--output", str(result)]) == 0
    standalone = json.loads(result.read_text())
    assert standalone["train_images"] == 10 and standalone["val_images"] == 10
    assert abs(standalone["top1"] - rows[-1]["knn_top1"]) <= 0.5


def test_separate_train_and_val_caps_draw_class_balanced_subsets_of_those_sizes_the_same_in_every_run(
        shards, probes, tmp_path):
    """``--monitor-max-train 20 --monitor-max-val 6`` on a probe of 2 classes (13 and 17 images per split):
    10 train and 3 val images per class, the files ``balanced_subset`` draws (seed 0), the same in a
    second run."""
    from trainer.eval.imagefolder import balanced_subset, scan_image_folder

    mixed = probes[2]
    listed = []
    for name in ("first", "second"):
        out = tmp_path / name
        assert cli.main(args(shards, out, 2, "--monitor", str(mixed), "--monitor-every", "2",
                             "--monitor-max-train", "20", "--monitor-max-val", "6")) == 0
        for row in records(out):
            assert (row["train_images"], row["val_images"], row["train_files"], row["val_files"]) == (20, 6, 30, 30)
        summary = json.loads((out / "train_summary.json").read_text())["monitor"]
        assert (summary["max_train"], summary["max_val"]) == (20, 6)
        listed.append(json.loads((out / "monitor_images.json").read_text())["mixed"])
    assert listed[0] == listed[1]
    for split, per_class in (("train", 10), ("val", 3)):
        assert sorted(Path(p).parent.name for p in listed[0][split]) == ["a"] * per_class + ["b"] * per_class
        _, samples = scan_image_folder(mixed / split)
        assert listed[0][split] == sorted(str(p) for p, _ in balanced_subset(samples, 2 * per_class))


def test_the_monitor_leaves_training_unchanged(shards, probes, tmp_path):
    """Same seed with and without the monitor: the same losses step by step (RNG and BatchNorm train mode
    restored after every evaluation of the small CNN, whose backbone has BatchNorm)."""
    colours = probes[0]
    assert cli.main(args(shards, tmp_path / "plain", 3)) == 0
    assert cli.main(args(shards, tmp_path / "watched", 3, "--monitor", str(colours), "--monitor-every", "1")) == 0
    plain = json.loads((tmp_path / "plain" / "train_summary.json").read_text())
    watched = json.loads((tmp_path / "watched" / "train_summary.json").read_text())
    assert [r["step"] for r in records(tmp_path / "watched")] == [0, 1, 2, 3]
    assert watched["losses"] == plain["losses"] and plain["monitor"] is None
    assert not (tmp_path / "plain" / "monitor.jsonl").exists()


def test_resume_keeps_the_earlier_evaluations_and_continues_the_cadence(shards, probes, tmp_path):
    colours = probes[0]
    out = tmp_path / "run"
    assert cli.main(args(shards, out, 2, "--monitor", str(colours), "--monitor-every", "2")) == 0
    assert [r["step"] for r in records(out)] == [0, 2]
    assert cli.main(args(shards, out, 4, "--monitor", str(colours), "--monitor-every", "2", "--resume", "auto",
                             "--resume-lr", "replan")) == 0
    assert [r["step"] for r in records(out)] == [0, 2, 4]


def test_prometheus_serves_one_knn_gauge_per_probe(tmp_path):
    live = TrainerMetrics(0, addr="127.0.0.1")
    try:
        live.update(7, {"train/loss": 1.5}, {})
        live.set_monitor([{"step": 6, "probe": "colour", "knn_top1": 87.5},
                          {"step": 6, "probe": "shape", "knn_top1": 40.0, "linear_top1": 45.0}], failures=1)
        samples = scrape_metrics(live.url)
    finally:
        live.close()
    assert samples['stablerep_trainer_knn_top1{probe="colour"}'] == 87.5
    assert samples['stablerep_trainer_knn_top1{probe="shape"}'] == 40.0
    assert samples['stablerep_trainer_linear_top1{probe="shape"}'] == 45.0
    assert samples["stablerep_trainer_monitor_step"] == 6 and samples["stablerep_trainer_monitor_failures_total"] == 1
    assert samples["stablerep_trainer_loss"] == 1.5  # the training samples stay next to the monitor's


@pytest.mark.parametrize("case, message", [
    ("no_val", "has no val/ sub-folder"),
    ("one_class", "a probe needs >= 2"),
    ("classes_differ", "classes differ between train/"),
    ("missing", "does not exist"),
    ("same_name", "also"),
])
def test_bad_probe_folders_exit_2_before_training_naming_the_folder(case, message, shards, tmp_path, capsys):
    folder = tmp_path / "probe"
    extra: list[str] = []
    if case == "no_val":
        write_colour_folder(folder / "train", per_class=2, seed=0)
    elif case == "one_class":
        probe_folder(folder, classes=("red",), train_per_class=2, val_per_class=1)
    elif case == "classes_differ":
        write_colour_folder(folder / "train", per_class=2, seed=0, classes=("red", "blue"))
        write_colour_folder(folder / "val", per_class=1, seed=1, classes=("red", "green"))
    elif case == "same_name":
        probe_folder(folder, train_per_class=2, val_per_class=1)
        probe_folder(tmp_path / "elsewhere" / "probe", train_per_class=2, val_per_class=1)
        extra = [str(tmp_path / "elsewhere" / "probe")]
    out = tmp_path / "run"
    code = cli.main(args(shards, out, 2, "--monitor", str(folder), *extra))
    err = capsys.readouterr().err
    assert code == 2 and message in err and "monitor.dirs" in err and str(folder) in err
    assert not out.exists()  # refused before anything was written


def test_bad_monitor_settings_exit_2(shards, probes, tmp_path, capsys):
    colours = probes[0]
    for flag, value in (("--monitor-every", "0"), ("--knn-k", "0"), ("--knn-temperature", "-1"),
                        ("--monitor-max-images", "-1")):
        code = cli.main(args(shards, tmp_path / "run", 2, "--monitor", str(colours), flag, value))
        assert code == 2 and f"monitor.{flag.lstrip('-').replace('-', '_').removeprefix('monitor_')}" in capsys.readouterr().err


def test_two_gloo_ranks_write_one_monitor_file(shards, probes, tmp_path):
    """Rank 0 evaluates while rank 1 waits at the barrier: one line per step and probe, one log line each.
    (``--monitor-dirs``: torchrun's own parser would take ``--monitor`` for its ``--monitor-interval``.)"""
    colours = probes[0]
    out = tmp_path / "run"
    proc = subprocess.run(
        [*launcher("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "trainer.cli",
         *args(shards, out, 4, "--monitor-dirs", str(colours), "--monitor-every", "2")],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = records(out)
    assert [(r["step"], r["probe"]) for r in rows] == [(0, "colours"), (2, "colours"), (4, "colours")]
    assert all(0.0 <= r["knn_top1"] <= 100.0 for r in rows)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["monitor"]["evaluations"] == 3
    assert (out / "train.log").read_text().count("monitor step ") == 3
    assert proc.stdout.count("monitor step ") == 3  # only rank 0 reports
