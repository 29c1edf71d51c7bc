"""The official StableRep recipe (google-research/syn-rep-learn, StableRep/) where it changes results.

Each test states the official behaviour as a fact and checks ours against it.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from trainer import cli
from trainer.config import build_config

GEN = ["--generators", "tcp://127.0.0.1:5555"]


# ----- 1. learning-rate rule: lr = blr * images_per_step / 256 * num_crop / 2 ------------------------------
def test_paper_preset_peak_lr_is_the_official_value():
    # official README command: 43 captions x 32 GPUs, n_img 6, blr 2e-4, num_crop 1 -> 3.225e-3
    cfg, _ = cli.parse_config(["--preset", "paper_vitb16_cc12m_1x", *GEN])
    assert cfg.peak_lr() == pytest.approx(2e-4 * 43 * 32 * 6 / 256 * 1 / 2)
    assert cfg.peak_lr() == pytest.approx(3.225e-3)


def test_crops_per_image_scales_lr_and_images():
    cfg, _ = cli.parse_config(["--preset", "paper_vitb16_cc12m_1x", *GEN, "--crops-per-image", "2",
                               "--draw-per-caption", "1"])
    assert cfg.augment.crops_per_image == 2
    assert cfg.images_per_step() == 1376 * 1 * 2
    assert cfg.peak_lr() == pytest.approx(2e-4 * 1376 / 256 * 2 / 2)


def test_print_config_shows_resolved_peak_lr():
    out = subprocess.run([sys.executable, "-m", "trainer.cli", "--preset", "paper_vitb16_cc12m_1x", *GEN,
                          "--print-config"], capture_output=True, text=True, check=True).stdout
    resolved = yaml.safe_load(out)["resolved"]
    assert resolved["peak_lr"] == pytest.approx(3.225e-3)


def test_bad_crops_per_image_is_named():
    with pytest.raises(ValueError, match="augment.crops_per_image"):
        build_config("cpu_small", overrides={"data": {"generators": GEN[1:]}, "augment": {"crops_per_image": 0}})
