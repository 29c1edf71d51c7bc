"""Does a caption policy collapse diversity? The study's measures of how groups spread over captions.

- :func:`gini`: the Gini coefficient of per-caption counts (0: every caption equally often; near 1:
  a few captions take everything). Captions never served count as zeros, so a policy that starves
  captions scores higher.
- :func:`attribute_shares`: for procedural captions (``a <colour> <shape> with <texture> on a
  <background> background``), the share of groups whose caption has each value of an attribute.
- :func:`ignored_classes`: the probe classes a policy fed least: for each attribute, the
  ``ceil(|values| / 4)`` values with the smallest share (the lowest quartile, at least one).
  A probe class is an attribute value, so this is the honest mapping from "captions the loop
  ignored" to probe accuracy: the held-out images of those classes.
- :func:`knn_per_class`: weighted k-NN accuracy of a backbone per class of a probe folder (the
  monitor's scorer, ``trainer.eval.knn``), to read the accuracy on those classes.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def gini(counts: Sequence[float]) -> float:
    """Gini coefficient of non-negative ``counts`` (one per caption, zeros included): the mean absolute
    difference of all pairs over twice the mean. 0.0 for equal counts (or all zero); (n - 1) / n when
    one caption holds everything."""
    values = np.sort(np.asarray(counts, dtype=np.float64))
    if values.size == 0:
        raise ValueError("gini needs at least one count")
    if (values < 0).any() or not np.isfinite(values).all():
        raise ValueError("gini needs finite counts >= 0")
    total = values.sum()
    if total == 0:
        return 0.0
    n = values.size
    ranks = np.arange(1, n + 1)
    return float((2.0 * (ranks * values).sum()) / (n * total) - (n + 1) / n)


def expected_gini_of_random_draws(draws: int, captions: int, seed: int = 0, repeats: int = 20) -> float:
    """The Gini of ``draws`` captions drawn uniformly at random with replacement among ``captions``
    (mean of ``repeats`` simulations): what a weighted draw scores with no preference at all."""
    rng = np.random.default_rng(seed)
    return float(np.mean([gini(np.bincount(rng.integers(0, captions, draws), minlength=captions))
                          for _ in range(repeats)]))


def diversity(counts: Mapping[int, int], caption_ids: Sequence[int]) -> dict[str, float]:
    """Spread of ``counts`` (caption id -> groups) over every caption of the set (``caption_ids``)."""
    full = [int(counts.get(c, 0)) for c in caption_ids]
    total = sum(full)
    shares = sorted((n / total for n in full), reverse=True) if total else [0.0]
    return {"groups": total, "captions_served": sum(1 for n in full if n), "captions": len(full), "gini": gini(full),
            "top_share": shares[0], "top10pct_share": sum(shares[: max(1, len(full) // 10)])}


def attribute_shares(counts: Mapping[int, int], caption_text: Mapping[int, str],
                     attributes: Sequence[str]) -> dict[str, dict[str, float]]:
    """attribute -> value -> share of the counted groups whose caption has that value (procedural
    captions; values never counted get 0.0)."""
    from generator_service.procedural.grammar import ATTRIBUTES, parse_caption

    total = sum(counts.values())
    out = {a: {v: 0.0 for v in ATTRIBUTES[a]} for a in attributes}
    if total == 0:
        return out
    for caption_id, n in counts.items():
        parsed = parse_caption(caption_text[caption_id])
        for a in attributes:
            out[a][parsed[a]] += n / total
    return out


def ignored_classes(shares: Mapping[str, Mapping[str, float]]) -> dict[str, list[str]]:
    """attribute -> the ``ceil(|values| / 4)`` values with the smallest share (ties: grammar order)."""
    out = {}
    for attribute, by_value in shares.items():
        values = list(by_value)
        keep = max(1, math.ceil(len(values) / 4))
        out[attribute] = sorted(values, key=lambda v: (by_value[v], values.index(v)))[:keep]
    return out


def knn_per_class(backbone_dir: Path, probe_dir: Path) -> dict[str, float]:
    """class name -> weighted k-NN top-1 (%) of ``backbone_dir`` on ``probe_dir/val`` against
    ``probe_dir/train`` (k 20, T 0.07, the monitor's defaults)."""
    from trainer.eval import KnnConfig, knn_class_scores, load_eval_backbone
    from trainer.eval.features import resolve_device
    from trainer.eval.probe import split_features

    device = resolve_device("auto")
    train, val = split_features(load_eval_backbone(backbone_dir), probe_dir / "train", probe_dir / "val", device,
                                256, 0, None)
    scores = knn_class_scores(train.features.to(device), train.labels.to(device), val.features.to(device),
                              train.num_classes, KnnConfig())
    right = (scores.argmax(dim=1).cpu() == val.labels).numpy()
    labels = val.labels.numpy()
    return {name: 100.0 * float(right[labels == i].mean()) for i, name in enumerate(val.class_names)
            if (labels == i).any()}
