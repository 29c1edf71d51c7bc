"""benchmarks/device_check.sh --dry-run: the one-lease GPU script, kept working on a CPU.

The default suite runs two stages (env, augment) and a deadline that skips a stage; the full dry
run (every stage, about 2.5 minutes on 2 cores) runs with STABLEREP_DEVICE_CHECK_FULL=1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "device_check.sh"
FULL = os.environ.get("STABLEREP_DEVICE_CHECK_FULL") == "1"


def run_check(out: Path, *args: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **env_vars}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args, str(out)], capture_output=True, text=True,
                          env=env, timeout=600)


def packed(out: Path) -> dict[str, bytes]:
    with tarfile.open(out / "device-check.tgz") as archive:
        return {m.name.removeprefix("./"): archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}


def stage_rows(files: dict[str, bytes]) -> dict[str, list[str]]:
    lines = files["stages.tsv"].decode().splitlines()
    assert lines[0].split("\t") == ["stage", "exit", "seconds", "limit"]
    return {row.split("\t")[0]: row.split("\t")[1:] for row in lines[1:]}


def test_dry_run_packs_every_stage_and_skips_what_misses_the_deadline(tmp_path):
    out = tmp_path / "out"
    done = run_check(out, "--stages", "env,augment")
    assert done.returncode == 0, done.stdout + done.stderr
    files = packed(out)
    rows = stage_rows(files)
    assert list(rows) == ["env", "augment"] and rows["env"][0] == rows["augment"][0] == "0"
    assert json.loads(files["augment.json"])["results"]["images_per_s"] > 0
    assert {"env.log", "augment.log", "run.txt"} <= set(files)
    assert (out / "stages.tsv").read_bytes() == files["stages.tsv"]

    # a 20 s deadline: env (limit 60 s) no longer fits and is recorded as skipped; exit 1
    skipped = run_check(tmp_path / "late", "--stages", "env", "--deadline", "20")
    assert skipped.returncode == 1
    assert stage_rows(packed(tmp_path / "late"))["env"] == ["skipped", "0", "60"]


def test_a_stage_past_its_limit_is_stopped_and_recorded(tmp_path):
    # a 1 s limit for the trainer stage (python alone starts slower): SIGINT, exit 124; the stage before it is kept
    done = run_check(tmp_path, "--stages", "env,trainer", LIMITS="trainer=1", GRACE_S="5")
    assert done.returncode == 1
    rows = stage_rows(packed(tmp_path))
    assert rows["trainer"][0] in ("124", "137") and rows["trainer"][2] == "1" and rows["env"][0] == "0"


def test_bad_usage_exits_2(tmp_path):
    for args in (["--stages", "nope"], ["--deadline", "soon"], []):
        done = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args] + ([str(tmp_path)] if args else []),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (args, done.stderr)
        assert "usage" in done.stderr or "device_check:" in done.stderr


@pytest.mark.skipif(not FULL, reason="the full dry run takes minutes (set STABLEREP_DEVICE_CHECK_FULL=1)")
def test_full_dry_run_within_five_minutes(tmp_path):
    done = run_check(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = stage_rows(packed(tmp_path))
    assert list(rows) == ["env", "cuda-tests", "trainer", "augment", "generator-paper", "generator-fast", "online"]
    assert all(row[0] == "0" for row in rows.values()), rows
