"""stablerep-eval fewshot: episode sampling, the logistic-regression solver, the CI and the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.eval_helpers import write_colour_folder
from trainer.eval.cli import main
from trainer.eval.features import FeatureSet
from trainer.eval.fewshot import (
    FewShotConfig,
    fewshot_eval,
    mean_confidence_interval,
    sample_episodes,
    solve_logistic_regression,
)


def test_confidence_interval_matches_hand_computation():
    # mean 75; population std sqrt((25^2 + 25^2 + 0 + 0) / 4) = 17.6777; 1.96 * 17.6777 / sqrt(4) = 17.3241
    mean, ci = mean_confidence_interval([50.0, 100.0, 75.0, 75.0])
    assert mean == pytest.approx(75.0)
    assert ci == pytest.approx(17.32412, abs=1e-4)
    mean, ci = mean_confidence_interval([60.0] * 600)
    assert (mean, ci) == (pytest.approx(60.0), pytest.approx(0.0))
    # 0/100 alternating: std 50 -> 1.96 * 50 / sqrt(100) = 9.8
    assert mean_confidence_interval([0.0, 100.0] * 50) == (pytest.approx(50.0), pytest.approx(9.8))
    with pytest.raises(ValueError):
        mean_confidence_interval([])


def test_episodes_are_seeded_and_disjoint():
    labels = torch.arange(8).repeat_interleave(25)
    cfg = FewShotConfig(n_way=5, k_shot=3, n_query=4, episodes=20, seed=7)
    ep = sample_episodes(labels, cfg, list(range(8)))
    again = sample_episodes(labels, cfg, list(range(8)))
    assert torch.equal(ep.support, again.support) and torch.equal(ep.query, again.query)
    assert ep.support.shape == (20, 15) and ep.query.shape == (20, 20)
    for e in range(20):
        assert len(set(ep.classes[e].tolist())) == 5
        assert not set(ep.support[e].tolist()) & set(ep.query[e].tolist())
        for idx, way in zip(ep.support[e].tolist(), ep.support_labels[e].tolist()):
            assert labels[idx] == ep.classes[e, way]
        for idx, way in zip(ep.query[e].tolist(), ep.query_labels[e].tolist()):
            assert labels[idx] == ep.classes[e, way]
    other = sample_episodes(labels, FewShotConfig(n_way=5, k_shot=3, n_query=4, episodes=20, seed=8), list(range(8)))
    assert not torch.equal(ep.support, other.support)


def test_batched_solver_equals_per_episode_solutions():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(3, 10, 6), dim=-1)
    y = torch.randint(0, 2, (3, 10))
    w_all, b_all = solve_logistic_regression(x, y, 2, inverse_reg=1.0, iters=200)
    for e in range(3):
        w, b = solve_logistic_regression(x[e:e + 1], y[e:e + 1], 2, inverse_reg=1.0, iters=200)
        assert torch.allclose(w_all[e], w[0], atol=1e-3) and torch.allclose(b_all[e], b[0], atol=1e-3)
    # stationarity of the regularized objective: grad = X^T (p - onehot) + W / C = 0
    p = torch.softmax(torch.einsum("esd,ecd->esc", x, w_all) + b_all[:, None], -1)
    resid = p - torch.nn.functional.one_hot(y, 2)
    grad_w = torch.einsum("esc,esd->ecd", resid, x) + w_all
    assert grad_w.abs().max() < 1e-3


def _features(separable: bool, classes: int = 6, per_class: int = 30, dim: int = 16) -> FeatureSet:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(classes).repeat_interleave(per_class)
    feats = torch.randn(len(labels), dim, generator=gen)
    if separable:
        centres = torch.randn(classes, dim, generator=gen) * 4
        feats = feats + centres[labels]
    return FeatureSet(feats, labels, [f"c{i}" for i in range(classes)], [])


def test_fewshot_accuracy_tracks_signal():
    cfg = FewShotConfig(episodes=100, seed=0)
    good = fewshot_eval(_features(True), cfg, torch.device("cpu"))
    noise = fewshot_eval(_features(False), cfg, torch.device("cpu"))
    assert good["accuracy"] > 95.0
    assert abs(noise["accuracy"] - 20.0) < 6.0, noise["accuracy"]
    assert noise["ci95"] == pytest.approx(1.96 * noise["episode_accuracy_std"] / math.sqrt(100))


def test_too_few_classes_or_images_is_an_error():
    data = _features(True, classes=4)
    with pytest.raises(ValueError, match="5 classes"):
        fewshot_eval(data, FewShotConfig(episodes=5), torch.device("cpu"))
    data = _features(True, classes=6, per_class=10)
    with pytest.raises(ValueError, match=">= 20"):
        fewshot_eval(data, FewShotConfig(episodes=5), torch.device("cpu"))


def test_fewshot_cli_on_image_folder(tmp_path):
    classes = ("red", "blue", "green", "yellow", "purple", "gray")
    write_colour_folder(tmp_path / "data", per_class=8, seed=0, classes=classes, size=32)
    (tmp_path / "data" / "gray" / "bad.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "few.json"
    code = main(["fewshot", "--checkpoint", "timm:vit_tiny_patch16_224", "--model-kwargs",
                 '{"img_size": 32, "patch_size": 8, "depth": 2}', "--workers", "0", "--data", str(tmp_path / "data"),
                 "--n-way", "5", "--k-shot", "2", "--n-query", "5", "--episodes", "50", "--output", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["accuracy"] > 80.0  # colours are linearly separable even through a random ViT
    assert result["skipped"] == [str(tmp_path / "data" / "gray" / "bad.png")]
    assert result["eligible_classes"] == 6
