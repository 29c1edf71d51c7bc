"""Weighted k-nearest-neighbour classification on frozen features (InstDisc / DINO protocol).

Features are L2-normalized; each query takes the ``k`` training features of highest cosine
similarity ``s_i``; neighbour ``i`` votes for its class with weight ``exp(s_i / T)``; the class of
largest total vote is the prediction. Defaults as in DINO's ``eval_knn.py``: ``k = 20``, ``T = 0.07``.
No training, no hyper-parameter search: the cheapest honest read of what a representation separates.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from trainer.eval.features import FeatureSet


@dataclass(frozen=True)
class KnnConfig:
    """``k`` neighbours, vote temperature ``temperature``, queries scored ``chunk`` at a time."""

    k: int = 20
    temperature: float = 0.07
    chunk: int = 1024

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k-NN k must be an integer >= 1, got {self.k!r}")
        if not self.temperature > 0:
            raise ValueError(f"k-NN temperature must be > 0, got {self.temperature!r}")
        if self.chunk < 1:
            raise ValueError(f"k-NN chunk must be >= 1, got {self.chunk!r}")


@torch.no_grad()
def knn_class_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    config: KnnConfig = KnnConfig(),
) -> torch.Tensor:
    """Summed neighbour votes per class.

    Args:
        train_features: float ``[N, D]`` (any norm; normalized here).
        train_labels: int64 ``[N]`` in ``[0, num_classes)``.
        query_features: float ``[M, D]`` on the same device.
        num_classes: ``C``.
    Returns:
        float ``[M, C]``: for each query, ``sum over its k nearest training features of
        exp(cos / T)``, per class of the neighbour (``k`` is capped at ``N``).
    """
    if train_features.ndim != 2 or query_features.ndim != 2 or train_features.shape[1] != query_features.shape[1]:
        raise ValueError(f"feature shapes {tuple(train_features.shape)} and {tuple(query_features.shape)} "
                         "must be [N, D] and [M, D]")
    if len(train_features) != len(train_labels) or len(train_features) == 0:
        raise ValueError(f"{len(train_features)} training features but {len(train_labels)} labels")
    bank = F.normalize(train_features.float(), dim=1)
    k = min(config.k, len(bank))
    scores = []
    for start in range(0, len(query_features), config.chunk):
        query = F.normalize(query_features[start:start + config.chunk].float(), dim=1)
        similarity, neighbours = (query @ bank.T).topk(k, dim=1)  # [m, k] each
        weights = (similarity / config.temperature).exp()
        votes = torch.zeros(len(query), num_classes, device=query.device, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels.to(query.device)[neighbours], weights)
        scores.append(votes)
    if not scores:
        return torch.zeros(0, num_classes, device=train_features.device)
    return torch.cat(scores)


def knn_eval(train: FeatureSet, val: FeatureSet, config: KnnConfig = KnnConfig(),
             device: torch.device | str = "cpu") -> dict[str, Any]:
    """Top-1 (and top-5 with more than 5 classes) accuracy in % of weighted k-NN from ``train`` to ``val``."""
    if train.class_names != val.class_names:
        raise ValueError(f"train classes {train.class_names} and val classes {val.class_names} differ")
    if len(val.labels) == 0:
        raise ValueError("k-NN needs at least one val feature")
    scores = knn_class_scores(train.features.to(device), train.labels.to(device), val.features.to(device),
                              train.num_classes, config)
    labels = val.labels.to(scores.device)
    top1 = 100.0 * int((scores.argmax(dim=1) == labels).sum()) / len(labels)
    top5 = None
    if train.num_classes > 5:
        top5 = 100.0 * int((scores.topk(5, dim=1).indices == labels[:, None]).any(dim=1).sum()) / len(labels)
    return {
        "protocol": "knn",
        "config": asdict(config),
        "k_used": min(config.k, len(train.labels)),
        "num_classes": train.num_classes,
        "class_names": list(train.class_names),
        "train_images": len(train.labels),
        "val_images": len(val.labels),
        "top1": top1,
        "top5": top5,
    }
