"""stablerep-bench plan over a live run: a real generator service and a real stablerep-train, each serving
its metrics (--metrics-port, 127.0.0.1); the planner reads the trainer's stall ratio and the generator's
idle ratio and says which side to grow. The generator's status line carries its idle ratio too."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.cli import main
from benchmarks.live_plan import advise
from generator_service.procedural import write_caption_file
from tests.polling import wait_for
from tests.test_train_cli import train_args
from tests.train_helpers import free_port, free_tcp_endpoint, scrape_metrics

REPO = Path(__file__).resolve().parents[1]


def _samples(url: str) -> dict[str, float]:
    try:
        return scrape_metrics(url, timeout=5)
    except OSError:
        return {}


def _live(generator_url: str, trainer_url: str) -> bool:
    generator, trainer = _samples(generator_url), _samples(trainer_url)
    return ("stablerep_generator_idle_ratio" in generator and "stablerep_trainer_stall_ratio" in trainer
            and trainer.get("stablerep_trainer_step", 0) >= 3)


def test_the_planner_reads_a_live_run_and_says_which_side_to_grow(tmp_path):
    captions = write_caption_file(tmp_path / "captions.txt", 40)
    endpoint, ports = free_tcp_endpoint(), {"generator": free_port(), "trainer": free_port()}
    urls = {name: f"http://127.0.0.1:{port}/metrics" for name, port in ports.items()}
    log = tmp_path / "generator.log"
    with open(log, "w") as log_file:
        service = subprocess.Popen(
            [sys.executable, "-m", "generator_service.cli", "--captions", str(captions), "--backend", "procedural",
             "--bind", endpoint, "--height", "32", "--width", "32", "--save-size", "32", "--images-per-group", "4",
             "--gpus", "cpu", "--log-level", "INFO", "--status-every", "0.2", "--metrics-port", str(ports["generator"])],
            cwd=REPO, stdout=log_file, stderr=log_file)
        trainer = subprocess.Popen(
            [sys.executable, "-m", "trainer.cli", *train_args(endpoint, tmp_path / "run", 100000, "--log-every", "1",
                                                              "--metrics-port", str(ports["trainer"]))],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert wait_for(lambda: _live(urls["generator"], urls["trainer"]) or trainer.poll() is not None
                            or service.poll() is not None, "both services' live metrics", timeout=300)
            assert trainer.poll() is None and service.poll() is None, "a service exited"
            assert main(["plan", "--live-trainer", urls["trainer"], "--live-generator", urls["generator"],
                         "--reuse", "4", "--output", str(tmp_path)]) == 0
            # the same endpoints, unreadable or half given: exit 2 naming the problem
            assert main(["plan", "--live-trainer", urls["trainer"], "--output", str(tmp_path)]) == 2
            assert main(["plan", "--live-trainer", "http://127.0.0.1:1/metrics", "--live-generator",
                         urls["generator"], "--output", str(tmp_path)]) == 2
        finally:
            for proc in (trainer, service):
                proc.terminate()
                proc.wait(timeout=120)

    results = json.loads((tmp_path / "plan.json").read_text())["results"]
    live, advice = results["live"], results["advice"]
    trainer_side = live["trainer"]
    assert 0.0 <= trainer_side["stall_ratio"] < 1.0 and trainer_side["images_per_s"] > 0
    assert results["trainer_images_per_s"] == pytest.approx(trainer_side["images_per_s"] / (1 - trainer_side["stall_ratio"]))
    generator_side = live["generators"][urls["generator"]]
    assert generator_side["workers"] == 1 and 0.0 <= generator_side["idle_ratio"] < 1.0
    assert results["generator_images_per_s"] == pytest.approx(generator_side["images"] / generator_side["gen_seconds"])
    assert results["generators_per_trainer"] == pytest.approx(results["trainer_images_per_s"]
                                                              / (4 * results["generator_images_per_s"]))
    assert advice == advise(live, results["generators_per_trainer"], 1)
    assert advice["generator_idle_ratio"] == {urls["generator"]: generator_side["idle_ratio"]}

    status = [line for line in log.read_text().splitlines() if "idle (queue full)" in line]
    assert status and all(re.search(r"idle \(queue full\) \d+\.\ds \(\d+%\)", line) for line in status), status[:3]


def test_the_advice_grows_the_side_that_waits():
    live = {"generator_workers": 3, "trainer": {"stall_ratio": 0.5}, "generators": {"g": {"idle_ratio": 0.0}}}
    starved = advise(live, generators_per_trainer=4.5, trainer_gpus=2)  # needs ceil(9) = 9, has 3
    assert (starved["grow"], starved["by_gpus"], starved["generator_gpus_needed"]) == ("generators", 6, 9)
    live = {"generator_workers": 12, "trainer": {"stall_ratio": 0.0}, "generators": {"g": {"idle_ratio": 0.6}}}
    idle = advise(live, generators_per_trainer=2.5, trainer_gpus=2)  # 12 feed floor(4.8) = 4 trainer GPUs
    assert (idle["grow"], idle["by_gpus"], idle["trainer_gpus_fed"]) == ("trainer", 2, 4)
    live["generator_workers"] = 5
    assert advise(live, generators_per_trainer=2.5, trainer_gpus=2)["grow"] == "neither"
    assert math.isclose(advise(live, 2.5, 2)["generator_idle_ratio"]["g"], 0.6)
