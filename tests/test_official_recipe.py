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


# ----- 4. logit scale clamped to [0, ln 100] after every optimizer step -----------------------------------
def test_clamp_logit_scale_bounds_the_parameter():
    import math

    import torch

    model = _tiny_model(text={"width": 32, "heads": 2, "layers": 1, "embed_dim": 16, "context_length": 16})
    for value, expected in ((7.0, math.log(100)), (-3.0, 0.0), (2.0, 2.0)):
        with torch.no_grad():
            model.logit_scale.fill_(value)
        model.clamp_logit_scale_()
        assert model.logit_scale.item() == pytest.approx(expected)


def test_training_clamps_logit_scale_after_each_step(tmp_path):
    import math

    from safetensors.torch import load_file

    from tests.train_helpers import write_shards
    from trainer.loop import train

    shards = write_shards(tmp_path / "shards", num_captions=8, m=2, size=32, groups_per_shard=8)
    cfg = build_config("cpu_small", overrides={
        "model": {"img_size": 32, "model_kwargs": {"patch_size": 8, "depth": 1}, "head_hidden": 16, "head_out": 8,
                  "text": {"width": 32, "heads": 2, "layers": 1, "embed_dim": 16, "context_length": 16}},
        "method": {"name": "clip"},
        "augment": {"strong": False},
        "data": {"source": "offline", "data": [str(shards)], "captions_per_step": 8, "draw_per_caption": 1,
                 "num_workers": 0},
        "optim": {"lr": 50.0},  # one AdamW step moves the scale by about 50: far outside [0, ln 100]
        "schedule": {"steps": 2, "warmup_steps": 0},
        "run": {"output": str(tmp_path / "run"), "progress": False, "log_with": []},
    })
    summary = train(cfg)
    state = load_file(str(next((tmp_path / "run" / "checkpoints" / "last").glob("model*.safetensors"))))
    scale = float(state["logit_scale"])
    assert summary["steps"] == 2
    assert 0.0 <= scale <= math.log(100) + 1e-6
    assert scale in (pytest.approx(0.0), pytest.approx(math.log(100)))
