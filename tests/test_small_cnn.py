"""The ``small_cnn`` timm model: built through the trainer's own path, exported and loaded back."""
from __future__ import annotations

import timm
import torch

from trainer.models.stablerep_model import build_model, load_backbone


def test_small_cnn_builds_trains_a_step_and_round_trips_through_export(tmp_path):
    model = build_model("small_cnn", img_size=64, model_kwargs={}, head_hidden=32, head_out=16, head_layers=2)
    assert model.num_features == 128
    images = torch.rand(4, 3, 64, 64)
    features = model.backbone(images)
    assert features.shape == (4, 128)
    loss = model.head(features).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.backbone.parameters())
    model.export_backbone(tmp_path)
    loaded = load_backbone(tmp_path)
    model.backbone.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model.backbone(images))
    assert timm.create_model("small_cnn", num_classes=6)(images).shape == (4, 6)


def test_an_exported_small_cnn_loads_in_a_fresh_evaluation_process(tmp_path):
    """``stablerep-eval`` on a demo run: the evaluation side registers the model by itself (a fresh
    interpreter that imports only ``trainer.eval`` must resolve ``small_cnn``)."""
    import subprocess
    import sys

    model = build_model("small_cnn", img_size=64, model_kwargs={}, head_hidden=32, head_out=16, head_layers=2)
    model.export_backbone(tmp_path)
    code = ("import sys, torch; from trainer.eval import load_eval_backbone; "
            "b = load_eval_backbone(sys.argv[1]); print(tuple(b.features(torch.rand(2, 3, 64, 64)).shape))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 128)"
