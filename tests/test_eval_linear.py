"""stablerep-eval linear: fast and paper protocols on a tiny random-init ViT over PIL-written folders."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.eval_helpers import write_colour_folder
from tests.polling import signal_when
from trainer.eval.backbones import BackboneSpecError, load_eval_backbone
from trainer.eval.cli import main
from trainer.eval.imagefolder import ImageFolderDataset, ImageFolderError
from trainer.eval.linear import ParallelLinear, parallel_cross_entropy, topk_correct

TINY_VIT = ["--checkpoint", "timm:vit_tiny_patch16_224", "--model-kwargs",
            '{"img_size": 32, "patch_size": 8, "depth": 2}', "--workers", "0"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    write_colour_folder(root / "train", per_class=24, seed=1)
    write_colour_folder(root / "val", per_class=40, seed=2)
    # Same kind of images, but each label folder holds exactly half red and half blue: labels carry no signal.
    write_colour_folder(root / "shuffled", per_class=24, seed=3, label_of=lambda c, i: ("red", "blue")[i % 2])
    return root


def _run(args: list[str], out: Path) -> dict:
    assert main(args + ["--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_fast_probe_separates_colours_and_control_is_chance(folders, tmp_path):
    real = _run(["linear", *TINY_VIT, "--train", str(folders / "train"), "--val", str(folders / "val")],
                tmp_path / "real.json")
    assert real["protocol"] == "fast" and real["num_classes"] == 2
    assert real["train_images"] == 48 and real["val_images"] == 80
    assert len(real["grid"]) == 4 * 3
    assert real["top1"] > 90.0
    assert real["selected"]["selected_on"] == "holdout"

    control = _run(["linear", *TINY_VIT, "--train", str(folders / "shuffled"), "--val", str(folders / "val")],
                   tmp_path / "control.json")
    assert 25.0 < control["top1"] < 72.0, control["top1"]


def test_paper_protocol_reports_every_lr(folders, tmp_path, capsys):
    result = _run(["linear", *TINY_VIT, "--protocol", "paper", "--epochs", "2", "--batch-size", "16",
                   "--probe-batch-size", "16", "--batch-norm", "--eval-every", "1",
                   "--lrs", "0.01,0.1,1.0", "--train", str(folders / "train"), "--val", str(folders / "val")],
                  tmp_path / "paper.json")
    assert [r["base_lr"] for r in result["per_lr"]] == [0.01, 0.1, 1.0]
    assert [r["lr"] for r in result["per_lr"]] == pytest.approx([0.01 / 16, 0.1 / 16, 1.0 / 16])
    assert len(result["history"]) == 2
    assert all(torch.isfinite(torch.tensor(h["train_loss"])).all() for h in result["history"])
    assert result["top1"] == max(r["top1"] for r in result["per_lr"])
    assert result["top1"] > 90.0
    # official: best over base lrs and over the evaluations (every epoch here); winner's lr and epoch shown
    evaluated = [(h["val_top1"][i], h["epoch"]) for h in result["history"] for i in range(3)]
    assert result["top1"] == max(t for t, _ in evaluated)
    sel = result["selected"]
    winner = result["history"][sel["epoch"] - 1]["val_top1"][[0.01, 0.1, 1.0].index(sel["base_lr"])]
    assert winner == result["top1"]
    out = capsys.readouterr().out
    assert f"best base lr {sel['base_lr']:g}" in out and f"at epoch {sel['epoch']}" in out


def test_paper_protocol_defaults_are_the_official_ones():
    from trainer.eval.linear import PaperProbeConfig

    cfg = PaperProbeConfig()
    assert cfg.base_lrs == (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
    assert (cfg.epochs, cfg.batch_size, cfg.momentum, cfg.weight_decay) == (90, 1024, 0.9, 0.0)
    assert cfg.batch_norm is False and cfg.eval_every == 10
    head = ParallelLinear(10, 768, 1000)           # classifier init N(0, 0.01), zero bias
    weights = torch.stack(list(head.weights))
    assert abs(weights.std().item() - 0.01) < 2e-4 and torch.all(torch.stack(list(head.biases)) == 0)
    assert isinstance(head.norm, torch.nn.Identity)


def test_parallel_heads_train_independently():
    torch.manual_seed(0)
    head = ParallelLinear(3, 4, 5)
    x, y = torch.randn(8, 4), torch.randint(0, 5, (8,))
    logits = head(x)
    assert logits.shape == (3, 8, 5)
    loss = parallel_cross_entropy(logits, y)
    expected = sum(torch.nn.functional.cross_entropy(logits[k], y) for k in range(3))
    assert torch.allclose(loss, expected)
    loss.backward()
    # head k's gradient equals the gradient of its own loss alone
    g1 = head.weights[1].grad.clone()
    head.zero_grad()
    torch.nn.functional.cross_entropy(head(x)[1], y).backward()
    assert torch.allclose(g1, head.weights[1].grad, atol=1e-6)
    assert topk_correct(torch.tensor([[[0.1, 0.9], [0.8, 0.2]]]), torch.tensor([1, 1]), 1).tolist() == [1]


def test_unreadable_image_is_skipped_and_counted(folders, tmp_path):
    import shutil

    train = tmp_path / "train"
    shutil.copytree(folders / "train", train)
    (train / "red" / "broken.png").write_bytes(b"not an image at all")
    result = _run(["linear", *TINY_VIT, "--epochs", "5", "--train", str(train), "--val", str(folders / "val")],
                  tmp_path / "skip.json")
    assert result["skipped_images"] == 1
    assert result["train_skipped"] == [str(train / "red" / "broken.png")]
    assert result["train_images"] == 48


def test_bad_folders_give_clear_errors(folders, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["linear", *TINY_VIT, "--train", str(missing), "--val", str(folders / "val")]) == 2
    assert str(missing) in capsys.readouterr().err

    empty_class = tmp_path / "empty_class"
    write_colour_folder(empty_class, per_class=2, seed=4)
    (empty_class / "green").mkdir()
    with pytest.raises(ImageFolderError, match="green"):
        ImageFolderDataset(empty_class)
    assert main(["linear", *TINY_VIT, "--train", str(empty_class), "--val", str(folders / "val")]) == 2
    assert str(empty_class / "green") in capsys.readouterr().err

    extra_class = tmp_path / "extra_val"
    write_colour_folder(extra_class, per_class=2, seed=5, classes=("red", "green"))
    assert main(["linear", *TINY_VIT, "--train", str(folders / "train"), "--val", str(extra_class)]) == 2
    assert "green" in capsys.readouterr().err


def test_backbone_specs(tmp_path):
    with pytest.raises(BackboneSpecError, match="does not exist"):
        load_eval_backbone(tmp_path / "no_run")
    (tmp_path / "run").mkdir()
    with pytest.raises(BackboneSpecError, match="backbone.json"):
        load_eval_backbone(tmp_path / "run")
    with pytest.raises(BackboneSpecError, match="no model named"):
        load_eval_backbone("timm:not_a_model_xyz")
    with pytest.raises(BackboneSpecError, match="local cache"):
        load_eval_backbone("timm-pretrained:vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    a = load_eval_backbone("random:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1}, seed=3)
    b = load_eval_backbone("random:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1}, seed=3)
    assert a.input_size == 32 and a.num_features == 192
    assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a.features(x), b.features(x)) and a.features(x).shape == (2, 192)


def test_exported_backbone_round_trip(tmp_path):
    """A run directory with backbone.json + backbone.safetensors (the trainer's export format) loads."""
    import timm
    from safetensors.torch import save_file

    kwargs = {"img_size": 32, "patch_size": 8, "depth": 1, "num_classes": 0}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    run = tmp_path / "run"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "backbone.safetensors"))
    (run / "backbone.json").write_text(json.dumps(
        {"model": "vit_tiny_patch16_224", "model_kwargs": kwargs, "num_features": model.num_features}))
    x = torch.randn(2, 3, 32, 32)
    for spec in (run, run / "backbone.json", run / "backbone.safetensors"):
        loaded = load_eval_backbone(spec)
        assert loaded.input_size == 32
        assert torch.allclose(loaded.features(x), model.eval()(x), atol=1e-5)
    (run / "backbone.json").write_text("{broken")
    with pytest.raises(BackboneSpecError, match="not valid JSON"):
        load_eval_backbone(run)


def test_sigterm_stops_the_probe_with_exit_130_naming_the_phase(folders, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "result.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.eval.cli", "linear", *TINY_VIT, "--train", str(folders / "train"),
         "--val", str(folders / "val"), "--cache-dir", str(cache), "--epochs", "200000", "--output", str(out)],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # both feature sets cached: the probe grid is training (for a long time at 200000 epochs)
    err = signal_when(proc, lambda: len(list(cache.glob("features-*.pt"))) == 2, "the cached features", signal.SIGTERM)
    assert proc.returncode == 130, err
    assert err.strip() == (f"stablerep-eval: interrupted by SIGTERM in the probe phase (fast grid of 12 classifiers); "
                           f"wrote {out} marked interrupted; features extracted so far stay in {cache}")
    result = json.loads(out.read_text())
    assert result["interrupted"] is True and result["stopped_at"]["phase"] == "probe"
