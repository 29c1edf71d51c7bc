"""The study's diversity measures and its mean/std over seeds, on hand-made counts and rows."""
from __future__ import annotations

import math

import pytest

from experiments.study_diversity import (
    attribute_shares, diversity, expected_gini_of_random_draws, gini, ignored_classes,
)
from experiments.study_summary import closed_loop_read, summarize


def test_gini_of_hand_made_counts():
    assert gini([5, 5, 5, 5]) == 0.0
    assert gini([0, 0, 0]) == 0.0
    assert gini([0, 0, 0, 8]) == pytest.approx(3 / 4)  # one caption holds everything: (n - 1) / n
    # [1, 2, 3, 4]: mean absolute difference over all ordered pairs 20/16 = 1.25, over twice the mean 5: 0.25
    assert gini([4, 1, 3, 2]) == pytest.approx(0.25)
    assert gini([0, 1]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least one"):
        gini([])
    with pytest.raises(ValueError, match=">= 0"):
        gini([1, -1])


def test_random_draws_are_unequal_and_diversity_counts_unserved_captions():
    # 100 draws over 100 captions at random: about Poisson(1) counts, a third unserved, Gini about 0.52
    # (the uniform walk's is 0)
    assert 0.45 < expected_gini_of_random_draws(100, 100) < 0.6
    spread = diversity({0: 3, 1: 1}, caption_ids=[0, 1, 2, 3])
    assert spread["groups"] == 4 and spread["captions_served"] == 2 and spread["captions"] == 4
    assert spread["gini"] == pytest.approx(gini([3, 1, 0, 0])) and spread["top_share"] == 0.75


def test_attribute_shares_and_the_classes_fed_least():
    text = {0: "a red circle with dots on a dark background", 1: "a red star with dots on a light background",
            2: "a blue circle with rings on a dark background"}
    shares = attribute_shares({0: 2, 1: 1, 2: 1}, text, ("colour", "shape"))
    assert shares["colour"]["red"] == 0.75 and shares["colour"]["blue"] == 0.25 and shares["colour"]["pink"] == 0.0
    assert shares["shape"]["circle"] == 0.75 and shares["shape"]["star"] == 0.25
    assert math.isclose(sum(shares["colour"].values()), 1.0)
    ignored = ignored_classes(shares)
    # 8 colours: the 2 with the least share (six at 0, grammar order breaks ties); 6 shapes: 2 of the four at 0
    assert ignored["colour"] == ["orange", "yellow"]
    assert ignored["shape"] == ["square", "triangle"]
    assert ignored_classes({"texture": {"stripes": 0.5, "dots": 0.1, "checks": 0.2, "rings": 0.2}}) == {"texture": ["dots"]}


def _arm(name, seed, colour, knn_dots, share_dots, gini_drawn):
    return {"name": name, "seed": seed, "probe": {"texture": colour}, "knn": {"texture": colour - 1},
            "fewshot": None, "drawn": {"gini": gini_drawn}, "groups_received": 100,
            "knn_per_class": {"texture": {"stripes": 50.0, "dots": knn_dots, "checks": 50.0, "rings": 50.0}},
            "generated_shares": {"texture": {"stripes": 0.3, "dots": share_dots, "checks": 0.3, "rings": 0.4 - share_dots}}}


def test_summary_means_and_stds_over_seeds_and_the_ignored_classes_read():
    study = {"plan": {"attributes": ["texture"]}, "random_init": [{"seed": 0, "probe": {"texture": 25.0}, "fewshot": None}],
             "arms": [_arm("online-uniform", 0, 40.0, 30.0, 0.25, 0.0), _arm("online-hard", 0, 44.0, 20.0, 0.1, 0.4),
                      _arm("online-uniform", 1, 42.0, 34.0, 0.25, 0.0), _arm("online-hard", 1, 48.0, 24.0, 0.05, 0.5)]}
    summary = summarize(study)
    assert summary["random init"]["probe"]["texture"] == {"mean": 25.0, "std": None, "n": 1}
    hard = summary["online-hard"]
    assert hard["seeds"] == [0, 1] and hard["probe"]["texture"]["mean"] == 46.0
    assert hard["probe"]["texture"]["std"] == pytest.approx(math.sqrt(8.0))  # ddof 1: ((2^2 + 2^2) / 1) ** 0.5
    assert hard["knn"]["texture"]["mean"] == 45.0 and hard["gini_drawn"]["mean"] == pytest.approx(0.45)
    assert hard["knn_full"]["texture"]["mean"] == pytest.approx(43.0)  # mean of (50+20+50+50)/4 and (50+24+50+50)/4
    read = closed_loop_read(study)
    assert [s["ignored"] for s in read["per_seed"]] == [{"texture": ["dots"]}, {"texture": ["dots"]}]
    assert read["mean"]["online-hard"]["texture"]["knn_top1"]["mean"] == 22.0
    assert read["mean"]["online-uniform"]["texture"]["knn_top1"]["mean"] == 32.0
    assert read["mean"]["online-hard"]["texture"]["share"]["mean"] == pytest.approx(0.075)
    assert read["per_seed"][0]["random_draw_gini"] is None  # these rows recorded no generated groups
    assert closed_loop_read({"arms": [a for a in study["arms"] if a["name"] != "online-hard"]}) is None
