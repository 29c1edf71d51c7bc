"""Plugins: an installed package adds a method and a generator backend through entry points.

``tests/plugins/stablerep_toy_plugin`` is a real distribution (``pyproject.toml`` with entry points in
``stablerep.methods`` and ``stablerep.generator_backends``). It is installed with pip into a temporary
folder (no network, nothing installed into the environment) and put on ``PYTHONPATH`` of real
``stablerep-generator`` and ``stablerep-train`` processes: the generator writes shards with the
plugin's backend, the trainer trains on them with the plugin's method.

The toy method ``toy-pairs`` is StableRep's loss on the first two images of each caption. At a huge
temperature every logit is ~0, so each anchor's loss is ``ln(K - 1)`` over its ``K`` images in the
batch: ``ln 7`` for 4 captions x 2 images, where the built-in stablerep (4 captions x 4 images) gives
``ln 15``. The loss values thus show which method ran.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PLUGIN_SOURCE = REPO / "tests" / "plugins" / "stablerep_toy_plugin"
CAPTIONS = ["a red cube", "a blue ball", "a green cone", "a yellow star", "a white ring", "a black box"]
TINY_TRAINER = [
    "--preset", "cpu_small", "--source", "offline", "--captions-per-step", "4", "--draw-per-caption", "4",
    "--img-size", "32", "--image-size", "32", "--model-kwargs", "depth=1", "--head-hidden", "32", "--head-out", "16",
    "--steps", "3", "--warmup-steps", "0", "--log-with", "--no-progress",
]


def _run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    """Environment whose PYTHONPATH holds this checkout and the plugin, installed by pip into a temp folder."""
    work = tmp_path_factory.mktemp("plugin")
    source = work / "source"
    shutil.copytree(PLUGIN_SOURCE, source)  # the build writes build/ and *.egg-info beside the sources
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, timeout=300)
    assert (target / "stablerep_toy_plugin-0.1.0.dist-info" / "entry_points.txt").is_file()
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(target)]), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def toy_shards(plugin_env, tmp_path_factory) -> Path:
    """Shards written by ``stablerep-generator --backend toy-stripes`` (the plugin's backend)."""
    work = tmp_path_factory.mktemp("toy_shards")
    (work / "captions.txt").write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    done = _run(["-m", "generator_service.cli", "--backend", "toy-stripes", "--captions", str(work / "captions.txt"),
                 "--out", str(work / "shards"), "--images-per-group", "4", "--height", "32", "--width", "32",
                 "--save-size", "32", "--gpus", "cpu"], plugin_env)
    assert done.returncode == 0, done.stderr[-3000:]
    return work / "shards"


def test_generator_writes_shards_with_the_plugin_backend(plugin_env, toy_shards):
    manifest = json.loads((toy_shards / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["generator"]["backend"] == "toy-stripes"
    with tarfile.open(next(toy_shards.glob("shard-*.tar"))) as tar:
        pngs = [m for m in tar.getmembers() if m.name.endswith(".png")]
        assert len(pngs) == len(CAPTIONS) * 4
        for member in pngs:
            image = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
            assert image.shape == (32, 32, 3)
            assert image[0, 0, 0] == 7  # the toy backend's mark
    refused = _run(["-m", "generator_service.cli", "--backend", "no-such-backend", "--out", "x"], plugin_env)
    assert refused.returncode == 2
    assert "toy-stripes" in refused.stderr  # the plugin's backend is among the choices named


def test_training_runs_the_plugin_method(plugin_env, toy_shards, tmp_path):
    output = tmp_path / "run"
    done = _run(["-m", "trainer.cli", *TINY_TRAINER, "--data", str(toy_shards), "--output", str(output),
                 "--method", "toy-pairs", "--temperature", "1e6"], plugin_env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((output / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["stopped"] == "completed" and summary["steps"] == summary["total_steps"] == 3
    assert summary["images_per_step"] == 4 * 2  # the plugin's views_in_loss: two images of each caption
    assert summary["losses"] == pytest.approx([math.log(4 * 2 - 1)] * 3, abs=1e-4)  # not ln 15 (stablerep)
    config = yaml.safe_load((output / "config.yaml").read_text(encoding="utf-8"))
    assert config["method"]["name"] == "toy-pairs"
    assert (output / "checkpoints" / "last").is_dir()


def test_help_lists_plugins_and_a_broken_one_is_a_clear_error(plugin_env, toy_shards, tmp_path):
    shown = _run(["-m", "trainer.cli", "--help"], plugin_env)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "toy-pairs" in shown.stdout and "toy-broken" in shown.stdout  # listed without importing them
    broken = _run(["-m", "trainer.cli", *TINY_TRAINER, "--data", str(toy_shards), "--output", str(tmp_path / "run"),
                   "--method", "toy-broken"], plugin_env)
    assert broken.returncode == 2
    assert "Traceback" not in broken.stderr
    for named in ("toy-broken", "stablerep_toy_plugin.broken:BrokenMethod", "stablerep-toy-plugin 0.1.0",
                  "stablerep_toy_plugin_missing_dependency"):
        assert named in broken.stderr, broken.stderr
    assert not (tmp_path / "run").exists()
