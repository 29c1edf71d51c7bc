"""Weighted k-NN (InstDisc / DINO): hand-computed votes on a tiny feature set, k and T at work, and
``stablerep-eval knn`` on real ImageFolders."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.eval_helpers import write_colour_folder
from trainer.eval import KnnConfig, knn_class_scores, knn_eval
from trainer.eval.cli import main as eval_main
from trainer.eval.features import FeatureSet

# Training features (not unit length: the scorer normalizes) and their classes.
# cos with the query q = (4, 3) / 5:  a -> 0.8,  b -> 0.6,  c -> 0.96.
BANK = torch.tensor([[2.0, 0.0], [0.0, 3.0], [3.0, 4.0]])  # a, b, c
LABELS = torch.tensor([0, 0, 1])
QUERY = torch.tensor([[4.0, 3.0]])


def test_votes_are_sums_of_exp_cosine_over_temperature_of_the_k_nearest():
    scores = knn_class_scores(BANK, LABELS, QUERY, num_classes=2, config=KnnConfig(k=3, temperature=1.0))
    expected = torch.tensor([[math.exp(0.8) + math.exp(0.6), math.exp(0.96)]])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert scores.argmax(1).item() == 0  # two weaker neighbours of class 0 outvote the nearest one


def test_k_and_temperature_change_the_prediction_as_computed_by_hand():
    nearest_only = knn_class_scores(BANK, LABELS, QUERY, 2, KnnConfig(k=1, temperature=1.0))
    torch.testing.assert_close(nearest_only, torch.tensor([[0.0, math.exp(0.96)]]), rtol=1e-5, atol=1e-5)
    # k = 2: neighbours c (0.96) and a (0.8); b (0.6) is left out.
    two = knn_class_scores(BANK, LABELS, QUERY, 2, KnnConfig(k=2, temperature=0.5))
    torch.testing.assert_close(two, torch.tensor([[math.exp(1.6), math.exp(1.92)]]), rtol=1e-5, atol=1e-3)
    # T = 0.07 sharpens the votes: exp(0.96/0.07) beats exp(0.8/0.07) + exp(0.6/0.07), class 1 wins with k = 3.
    sharp = knn_class_scores(BANK, LABELS, QUERY, 2, KnnConfig(k=3, temperature=0.07))
    assert sharp.argmax(1).item() == 1
    assert sharp[0, 1] / sharp[0, 0] == pytest.approx(
        math.exp(0.96 / 0.07) / (math.exp(0.8 / 0.07) + math.exp(0.6 / 0.07)), rel=1e-4)


def test_top1_of_a_hand_made_val_set_and_k_capped_at_the_bank_size():
    train = FeatureSet(BANK, LABELS, ["zero", "one"], [])
    # q -> class 0 (label 0, right); (0, 1): cos a 0, b 1, c 0.8 -> e^0 + e^1 > e^0.8 -> class 0 (right);
    # (3, 4) labelled 1: cos a 0.6, b 0.8, c 1 -> e^0.6 + e^0.8 = 4.05 > e^1 = 2.72 -> class 0 (wrong).
    val = FeatureSet(torch.tensor([[4.0, 3.0], [0.0, 1.0], [3.0, 4.0]]), torch.tensor([0, 0, 1]), ["zero", "one"], [])
    result = knn_eval(train, val, KnnConfig(k=20, temperature=1.0))
    assert result["k_used"] == 3 and result["top1"] == pytest.approx(200 / 3) and result["top5"] is None
    chunked = knn_eval(train, val, KnnConfig(k=20, temperature=1.0, chunk=1))
    assert chunked["top1"] == result["top1"]


def test_bad_settings_and_mismatched_classes_are_refused():
    with pytest.raises(ValueError, match="k-NN k"):
        KnnConfig(k=0)
    with pytest.raises(ValueError, match="temperature"):
        KnnConfig(temperature=0.0)
    train = FeatureSet(BANK, LABELS, ["zero", "one"], [])
    other = FeatureSet(BANK, LABELS, ["zero", "two"], [])
    with pytest.raises(ValueError, match="differ"):
        knn_eval(train, other)


@pytest.fixture(scope="module")
def colour_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    write_colour_folder(root / "train", per_class=12, seed=0, classes=("red", "blue", "green"))
    write_colour_folder(root / "val", per_class=6, seed=1, classes=("red", "blue", "green"))
    (root / "val" / "red" / "broken.png").write_bytes(b"not a png")
    return root


def test_eval_knn_cli_scores_colours_and_counts_a_corrupt_image(colour_split, tmp_path, capsys):
    out = tmp_path / "knn.json"
    code = eval_main(["knn", "--checkpoint", "timm:small_cnn", "--train", str(colour_split / "train"),
                      "--val", str(colour_split / "val"), "--workers", "0", "--device", "cpu",
                      "--output", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["val_images"] == 18 and result["train_images"] == 36 and result["skipped_images"] == 1
    assert result["config"]["k"] == 20 and result["config"]["temperature"] == 0.07
    assert result["top1"] > 90  # colour is what a random conv net already separates
    printed = capsys.readouterr().out
    assert "k-NN (k=20, T=0.07)" in printed and "skipped 1 unreadable" in printed


def test_eval_knn_cli_bad_input_exits_2(colour_split, tmp_path, capsys):
    code = eval_main(["knn", "--checkpoint", "timm:small_cnn", "--train", str(colour_split / "train"),
                      "--val", str(tmp_path / "missing"), "--workers", "0"])
    assert code == 2 and "missing" in capsys.readouterr().err
    code = eval_main(["knn", "--checkpoint", "timm:small_cnn", "--train", str(colour_split / "train"),
                      "--val", str(colour_split / "val"), "--knn-k", "0", "--workers", "0"])
    assert code == 2 and "k-NN k" in capsys.readouterr().err


def test_balanced_subset_keeps_the_same_share_of_every_class_and_is_the_same_in_every_call(tmp_path):
    from pathlib import Path

    from trainer.eval.imagefolder import balanced_subset

    samples = [(Path(f"c{label}/{i:03d}.png"), label) for label, count in ((0, 40), (1, 25), (2, 3)) for i in range(count)]
    subset = balanced_subset(samples, max_images=30)
    counts = {label: sum(1 for _, lab in subset if lab == label) for label in (0, 1, 2)}
    assert counts == {0: 10, 1: 10, 2: 3}  # 30 // 3 per class; a class with fewer keeps all of its own
    assert subset == balanced_subset(list(samples), max_images=30)  # drawn by a fixed seed: the same every time
    assert subset == sorted(subset, key=samples.index)  # in the order of the folder
    assert subset[:10] != samples[:10]  # drawn, not the first files of each class
    assert balanced_subset(samples, max_images=30, seed=1) != subset
    assert balanced_subset(samples, max_images=0) == samples == balanced_subset(samples, max_images=len(samples))
    assert len(balanced_subset(samples, max_images=2)) == 3  # at least one image per class
