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


# ----- 3. projection head per view chunk, SyncBatchNorm ---------------------------------------------------
def _tiny_model(**kw):
    from trainer.model import build_model

    return build_model("vit_tiny_patch16_224", img_size=32, model_kwargs={"patch_size": 8, "depth": 1},
                       head_hidden=16, head_out=8, **kw)


def test_head_runs_once_per_view_chunk_with_its_own_batch_statistics():
    import torch

    torch.manual_seed(0)
    model = _tiny_model(head_per_view=True).train()
    groups, views = 5, 3
    features = torch.randn(groups * views, model.num_features)
    out = model.project(features, views)
    # official: chunk j = the images at index j of every group, the head (BN in train mode) on each chunk
    grouped = features.view(groups, views, -1)
    expected = torch.stack([model.head(grouped[:, j]) for j in range(views)], dim=1).flatten(0, 1)
    assert torch.equal(out, expected)
    # and it differs from one BN over all 15 rows
    assert not torch.allclose(out, model.head(features))
    old = _tiny_model(head_per_view=False).train()
    old.load_state_dict(model.state_dict())
    assert torch.allclose(old.project(features, views), model.head(features))


def test_paper_preset_uses_per_view_head_and_sync_bn():
    import torch

    cfg, _ = cli.parse_config(["--preset", "paper_vitb16_cc12m_1x", *GEN])
    assert cfg.model.head_per_view and cfg.model.sync_bn
    assert cfg.resolved_dict()["resolved"]["head_batchnorm"] == "per view chunk, synchronized across processes"
    model = _tiny_model(head_per_view=True, sync_bn=True)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.head.modules())
    old, _ = cli.parse_config(["--preset", "paper_vitb16_cc12m_1x", *GEN, "--head-all-views", "--no-sync-bn"])
    assert not old.model.head_per_view and not old.model.sync_bn
