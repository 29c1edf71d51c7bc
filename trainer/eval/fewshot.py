"""N-way K-shot episodes with logistic regression on frozen, L2-normalized features.

All episodes of a chunk are solved together: the objective is a sum of independent, strictly convex
per-episode problems, so one L-BFGS run on the sum reaches every episode's own optimum.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trainer.eval.features import FeatureSet


@dataclass
class FewShotConfig:
    """``inverse_reg`` is the C of L2-regularized logistic regression: loss = sum CE + ||W||^2 / (2C)."""

    n_way: int = 5
    k_shot: int = 5
    n_query: int = 15
    episodes: int = 600
    seed: int = 0
    inverse_reg: float = 1.0
    lbfgs_iters: int = 100
    episode_chunk: int = 200

    def __post_init__(self) -> None:
        for name in ("n_way", "k_shot", "n_query", "episodes", "lbfgs_iters", "episode_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_way < 2:
            raise ValueError(f"n_way must be >= 2, got {self.n_way}")
        if self.inverse_reg <= 0:
            raise ValueError(f"inverse_reg must be > 0, got {self.inverse_reg}")


def mean_confidence_interval(accuracies: torch.Tensor | np.ndarray | list[float]) -> tuple[float, float]:
    """Mean and 95% half-width ``1.96 * std / sqrt(n)`` (population std, ddof=0) of per-episode accuracies."""
    acc = np.asarray(accuracies, dtype=np.float64)
    if acc.size == 0:
        raise ValueError("no episode accuracies")
    return float(acc.mean()), float(1.96 * acc.std() / math.sqrt(acc.size))


@dataclass
class Episodes:
    """support: int64 ``[E, n_way * k_shot]`` feature indices, support_labels the same shape in [0, n_way);
    query / query_labels: ``[E, n_way * n_query]``; classes: ``[E, n_way]`` original class ids."""

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    classes: torch.Tensor


def eligible_classes(labels: torch.Tensor, need: int) -> tuple[list[int], list[int]]:
    """Classes with at least ``need`` samples, and those with fewer."""
    counts = torch.bincount(labels)
    ok = [c for c in range(len(counts)) if counts[c] >= need]
    short = [c for c in range(len(counts)) if 0 < counts[c] < need]
    return ok, short


def sample_episodes(labels: torch.Tensor, cfg: FewShotConfig, classes: list[int]) -> Episodes:
    """Seeded episodes: ``n_way`` distinct classes, then ``k_shot + n_query`` distinct images of each."""
    rng = np.random.default_rng(cfg.seed)
    by_class = {c: (labels == c).nonzero().flatten().numpy() for c in classes}
    per = cfg.k_shot + cfg.n_query
    support, query, chosen = [], [], []
    for _ in range(cfg.episodes):
        picked = rng.choice(classes, size=cfg.n_way, replace=False)
        rows = np.stack([rng.choice(by_class[int(c)], size=per, replace=False) for c in picked])  # [n_way, per]
        support.append(rows[:, :cfg.k_shot].reshape(-1))
        query.append(rows[:, cfg.k_shot:].reshape(-1))
        chosen.append(picked)
    way = torch.arange(cfg.n_way)
    return Episodes(
        support=torch.as_tensor(np.stack(support)),
        support_labels=way.repeat_interleave(cfg.k_shot).expand(cfg.episodes, -1).clone(),
        query=torch.as_tensor(np.stack(query)),
        query_labels=way.repeat_interleave(cfg.n_query).expand(cfg.episodes, -1).clone(),
        classes=torch.as_tensor(np.stack(chosen)),
    )


def solve_logistic_regression(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, inverse_reg: float, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``E`` independent multinomial logistic regressions with L-BFGS.

    x: ``[E, S, D]``, y: int64 ``[E, S]`` -> weights ``[E, C, D]``, biases ``[E, C]`` minimizing, per episode,
    ``sum_i CE(W x_i + b, y_i) + ||W||^2 / (2 * inverse_reg)``.
    """
    e, _, d = x.shape
    weight = torch.zeros(e, num_classes, d, device=x.device, requires_grad=True)
    bias = torch.zeros(e, num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9, history_size=20)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = torch.einsum("esd,ecd->esc", x, weight) + bias[:, None, :]
        loss = F.cross_entropy(logits.reshape(-1, num_classes), y.reshape(-1), reduction="sum")
        loss = loss + weight.pow(2).sum() / (2 * inverse_reg)
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


@torch.no_grad()
def episode_accuracies(
    features: torch.Tensor, episodes: Episodes, cfg: FewShotConfig, device: torch.device
) -> torch.Tensor:
    """Per-episode query accuracy in %, float64 ``[E]``. ``features`` ``[N, D]`` are L2-normalized here."""
    feats = F.normalize(features.float(), dim=-1).to(device)
    out = []
    for start in range(0, len(episodes.support), cfg.episode_chunk):
        sl = slice(start, start + cfg.episode_chunk)
        xs, ys = feats[episodes.support[sl].to(device)], episodes.support_labels[sl].to(device)
        xq, yq = feats[episodes.query[sl].to(device)], episodes.query_labels[sl].to(device)
        with torch.enable_grad():
            weight, bias = solve_logistic_regression(xs, ys, cfg.n_way, cfg.inverse_reg, cfg.lbfgs_iters)
        pred = (torch.einsum("eqd,ecd->eqc", xq, weight) + bias[:, None, :]).argmax(-1)
        out.append((pred == yq).double().mean(1).cpu() * 100)
    return torch.cat(out)


def fewshot_eval(data: FeatureSet, cfg: FewShotConfig, device: torch.device) -> dict[str, Any]:
    """Run ``cfg.episodes`` seeded episodes over ``data``; mean accuracy (%) +- 95% CI."""
    start = time.perf_counter()
    need = cfg.k_shot + cfg.n_query
    classes, short = eligible_classes(data.labels, need)
    if len(classes) < cfg.n_way:
        raise ValueError(
            f"{cfg.n_way}-way {cfg.k_shot}-shot with {cfg.n_query} queries needs {cfg.n_way} classes with >= {need} "
            f"readable images; only {len(classes)} have that ({[data.class_names[c] for c in classes]})"
        )
    episodes = sample_episodes(data.labels, cfg, classes)
    acc = episode_accuracies(data.features, episodes, cfg, device)
    mean, ci = mean_confidence_interval(acc.numpy())
    return {
        "protocol": "fewshot",
        "config": asdict(cfg),
        "accuracy": mean,
        "ci95": ci,
        "episode_accuracy_std": float(acc.std(unbiased=False)),
        "num_classes": data.num_classes,
        "eligible_classes": len(classes),
        "excluded_classes": {data.class_names[c]: int((data.labels == c).sum()) for c in short},
        "images": len(data.labels),
        "skipped": data.skipped,
        "seconds": time.perf_counter() - start,
    }
