"""Linear probing on a frozen backbone: a fast protocol on cached features and the paper's protocol.

Both train many linear classifiers at once (:class:`ParallelLinear`, one per hyper-parameter
setting) so a sweep costs about as much as a single classifier.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from itertools import product
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.eval.backbones import EvalBackbone
from trainer.eval.features import FeatureSet, make_loader
from trainer.eval.imagefolder import ImageFolderDataset


class ParallelLinear(nn.Module):
    """``K`` independent linear classifiers over the same features.

    forward: ``x`` float ``[N, D]`` -> logits ``[K, N, C]``. An optional ``BatchNorm1d(affine=False)``
    (shared; it has no learnable parameters) standardizes the features first, as in MAE/MoCo v3.
    Each classifier's weight and bias are their own parameters, so each can live in its own optimizer
    group with its own learning rate and weight decay.
    """

    def __init__(self, num_heads: int, dim: int, num_classes: int, batch_norm: bool = False):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if batch_norm else nn.Identity()
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(num_classes, dim) * 0.01) for _ in range(num_heads)]
        )
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(num_classes)) for _ in range(num_heads)])

    @property
    def num_heads(self) -> int:
        return len(self.weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        weight = torch.stack(list(self.weights))  # [K, C, D]
        bias = torch.stack(list(self.biases))  # [K, C]
        return torch.einsum("nd,kcd->knc", x, weight) + bias[:, None, :]

    def param_groups(self, lrs: list[float], weight_decays: list[float]) -> list[dict[str, Any]]:
        """One group per classifier weight (its lr and wd) and one per bias (its lr, no wd)."""
        groups = []
        for w, b, lr, wd in zip(self.weights, self.biases, lrs, weight_decays):
            groups.append({"params": [w], "lr": lr, "weight_decay": wd})
            groups.append({"params": [b], "lr": lr, "weight_decay": 0.0})
        return groups


def parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over heads of each head's mean cross-entropy. logits ``[K, N, C]``, labels ``[N]``."""
    k, n, c = logits.shape
    return F.cross_entropy(logits.reshape(k * n, c).float(), labels.repeat(k), reduction="sum") / n


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per-head count of samples whose label is among the top ``k``. logits ``[K, N, C]`` -> ``[K]``."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices  # [K, N, k]
    return (top == labels[None, :, None]).any(dim=-1).sum(dim=1)


def cosine_lambda(total_steps: int, warmup_steps: int = 0):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ----------------------------------------------------------------------------- fast protocol


@dataclass
class FastProbeConfig:
    """Grid of classifiers on cached, standardized features; hyper-parameters chosen on a held-out
    part of the training set (``select="holdout"``) or, as the paper reports, on val (``"val"``)."""

    lrs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3)
    epochs: int = 100
    batch_size: int = 1024
    momentum: float = 0.9
    standardize: bool = True
    select: str = "holdout"
    holdout_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.select not in ("holdout", "val"):
            raise ValueError(f"select must be 'holdout' or 'val', got {self.select!r}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if not self.lrs or not self.weight_decays:
            raise ValueError("the grid needs at least one lr and one weight decay")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices so each class with >= 2 samples puts ``ceil(fraction * n)`` of them in the holdout."""
    gen = torch.Generator().manual_seed(seed)
    keep, hold = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_hold = min(len(idx) - 1, math.ceil(fraction * len(idx))) if len(idx) >= 2 else 0
        hold.append(idx[:n_hold])
        keep.append(idx[n_hold:])
    return torch.cat(keep).sort().values, torch.cat(hold).sort().values


def train_classifier_grid(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: FastProbeConfig, device: torch.device
) -> ParallelLinear:
    """Train one classifier per (lr, wd) of the grid on features ``x [N, D]``, labels ``y [N]``."""
    grid = list(product(cfg.lrs, cfg.weight_decays))
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    head = ParallelLinear(len(grid), x.shape[1], num_classes).to(device)
    opt = torch.optim.SGD(
        head.param_groups([lr for lr, _ in grid], [wd for _, wd in grid]), lr=cfg.lrs[0], momentum=cfg.momentum
    )
    batch = min(cfg.batch_size, len(x))
    steps_per_epoch = max(1, len(x) // batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(cfg.epochs * steps_per_epoch))
    x, y = x.to(device), y.to(device)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=gen).to(device)
        for s in range(steps_per_epoch):
            idx = order[s * batch:(s + 1) * batch]
            loss = parallel_cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"linear probe loss is {loss.item()} (try smaller --lrs)")
    return head.eval()


@torch.no_grad()
def grid_accuracy(
    head: ParallelLinear, x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> tuple[list[float], list[float]]:
    """Per-classifier top-1 and top-5 accuracy (in %) over features ``x [N, D]``."""
    top1 = torch.zeros(head.num_heads, device=device)
    top5 = torch.zeros(head.num_heads, device=device)
    for start in range(0, len(x), 4096):
        xb, yb = x[start:start + 4096].to(device), y[start:start + 4096].to(device)
        logits = head(xb)
        top1 += topk_correct(logits, yb, 1)
        top5 += topk_correct(logits, yb, 5)
    n = max(1, len(x))
    return (top1 * 100 / n).tolist(), (top5 * 100 / n).tolist()


def fast_linear_probe(train: FeatureSet, val: FeatureSet, cfg: FastProbeConfig, device: torch.device) -> dict[str, Any]:
    """Sweep ``cfg.lrs x cfg.weight_decays`` on cached features; report the selected and all settings."""
    if train.class_names != val.class_names:
        raise ValueError(f"train classes {train.class_names} and val classes {val.class_names} differ")
    start = time.perf_counter()
    x_train, x_val = train.features.float(), val.features.float()
    if cfg.standardize:  # BatchNorm1d(affine=False) at eval time, with the training set's statistics
        mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
        x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    grid = list(product(cfg.lrs, cfg.weight_decays))
    num_classes = train.num_classes
    holdout_top1 = None
    if cfg.select == "holdout":
        keep, hold = stratified_holdout(train.labels, cfg.holdout_fraction, cfg.seed)
        if len(hold) == 0:
            raise ValueError("holdout selection needs >= 2 training images in some class; use select='val'")
        head = train_classifier_grid(x_train[keep], train.labels[keep], num_classes, cfg, device)
        holdout_top1, _ = grid_accuracy(head, x_train[hold], train.labels[hold], device)
    head = train_classifier_grid(x_train, train.labels, num_classes, cfg, device)
    val_top1, val_top5 = grid_accuracy(head, x_val, val.labels, device)
    train_top1, _ = grid_accuracy(head, x_train, train.labels, device)
    score = holdout_top1 if holdout_top1 is not None else val_top1
    best = max(range(len(grid)), key=lambda i: (score[i], -i))
    oracle = max(range(len(grid)), key=lambda i: (val_top1[i], -i))
    rows = []
    for i, (lr, wd) in enumerate(grid):
        row = {"lr": lr, "weight_decay": wd, "train_top1": train_top1[i], "top1": val_top1[i]}
        row["top5"] = val_top5[i] if num_classes > 5 else None
        if holdout_top1 is not None:
            row["holdout_top1"] = holdout_top1[i]
        rows.append(row)
    return {
        "protocol": "fast",
        "config": asdict(cfg),
        "num_classes": num_classes,
        "class_names": train.class_names,
        "train_images": len(train.labels),
        "val_images": len(val.labels),
        "grid": rows,
        "selected": {"lr": grid[best][0], "weight_decay": grid[best][1], "selected_on": cfg.select},
        "top1": val_top1[best],
        "top5": rows[best]["top5"],
        "oracle_top1": val_top1[oracle],
        "probe_seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------- paper protocol


@dataclass
class PaperProbeConfig:
    """The official StableRep linear probe: SGD (momentum 0.9, weight decay 0) on augmented views
    through the frozen backbone, batch 1024, 90 epochs, cosine schedule, one classifier per base lr
    (lr = base * batch / 256; the official 10 base lrs 0.001..0.5), classifiers initialised N(0, 0.01)
    with zero bias, no BatchNorm before them by default. Val is evaluated every ``eval_every`` epochs
    (and at the end); the reported result is the best over base lrs *and* evaluations."""

    base_lrs: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
    epochs: int = 90
    batch_size: int = 1024
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_norm: bool = False
    warmup_epochs: int = 0
    eval_every: int = 10  # epochs between val evaluations (0: only at the end)
    seed: int = 0
    workers: int = 0

    def __post_init__(self) -> None:
        if not self.base_lrs:
            raise ValueError("the paper protocol needs at least one base lr")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"epochs must be >= 1 and batch_size >= 2, got {self.epochs} and {self.batch_size}")


@torch.no_grad()
def _evaluate_heads(
    backbone: EvalBackbone, head: ParallelLinear, loader, device
) -> tuple[list[float], list[float], int, list[int]]:
    """Per-head top-1/top-5 (%) over ``loader``, images evaluated, dataset indices skipped."""
    head.eval()
    skipped: list[int] = []
    top1 = torch.zeros(head.num_heads, device=device)
    top5 = torch.zeros(head.num_heads, device=device)
    seen = 0
    for batch in loader:
        skipped.extend(batch.skipped)
        if batch.labels.numel() == 0:
            continue
        labels = batch.labels.to(device)
        feats = backbone.features(batch.images.to(device, non_blocking=True))  # fp32 features
        logits = head(feats.float())
        top1 += topk_correct(logits, labels, 1)
        top5 += topk_correct(logits, labels, 5)
        seen += len(labels)
    n = max(1, seen)
    return (top1 * 100 / n).tolist(), (top5 * 100 / n).tolist(), seen, skipped


def best_per_head(history: list[dict[str, Any]], num_heads: int) -> tuple[list[float], list[float | None], list[int]]:
    """Each head's best evaluation: its highest val top-1 over every evaluated epoch of ``history``
    (entries ``{"epoch", "val_top1": [K], "val_top5": [K]}``; epochs without ``val_top1`` were not
    evaluated), the top-5 of that evaluation and its epoch. Ties go to the earlier epoch."""
    top1, top5, epochs = [-1.0] * num_heads, [None] * num_heads, [0] * num_heads
    for entry in history:
        if "val_top1" not in entry:
            continue
        for i in range(num_heads):
            if entry["val_top1"][i] > top1[i]:
                top1[i], top5[i], epochs[i] = entry["val_top1"][i], entry["val_top5"][i], entry["epoch"]
    return top1, top5, epochs


def paper_linear_probe(
    backbone: EvalBackbone,
    train: ImageFolderDataset,
    val: ImageFolderDataset,
    cfg: PaperProbeConfig,
    device: torch.device,
    log=print,
) -> dict[str, Any]:
    """Train ``len(cfg.base_lrs)`` classifiers in parallel on augmented views (``train.transform``)."""
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    backbone.model.to(device).eval()
    num_classes = len(train.class_names)
    head = ParallelLinear(len(cfg.base_lrs), backbone.num_features, num_classes, batch_norm=cfg.batch_norm).to(device)
    lrs = [base * cfg.batch_size / 256 for base in cfg.base_lrs]
    opt = torch.optim.SGD(head.param_groups(lrs, [cfg.weight_decay] * len(lrs)), lr=lrs[0], momentum=cfg.momentum)
    drop_last = len(train) > cfg.batch_size
    train_loader = make_loader(train, cfg.batch_size, cfg.workers, shuffle=True, seed=cfg.seed, drop_last=drop_last)
    val_loader = make_loader(val, cfg.batch_size, cfg.workers)
    steps_per_epoch = max(1, len(train_loader))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, cosine_lambda(cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch)
    )
    history, skipped = [], set()
    top1 = top5 = None
    for epoch in range(cfg.epochs):
        head.train()
        total, seen = torch.zeros(len(lrs), device=device), 0
        for batch in train_loader:
            skipped.update(train.path(i) for i in batch.skipped)
            if batch.labels.numel() < 2:  # BatchNorm needs two samples
                continue
            labels = batch.labels.to(device)
            with torch.no_grad():  # frozen backbone, fp32 features as the official probe
                feats = backbone.features(batch.images.to(device, non_blocking=True))
            logits = head(feats.float())
            loss = parallel_cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                per_head = F.cross_entropy(
                    logits.reshape(-1, num_classes).float(), labels.repeat(len(lrs)), reduction="none"
                ).view(len(lrs), -1).sum(1)
            total += per_head
            seen += len(labels)
        if seen == 0:
            raise ValueError(f"no decodable training image in {train.root}")
        if not torch.isfinite(total).all():
            raise FloatingPointError(f"linear probe loss is not finite at epoch {epoch} (lrs {lrs})")
        entry = {"epoch": epoch + 1, "train_loss": (total / seen).tolist()}
        last = epoch + 1 == cfg.epochs
        if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            top1, top5, val_seen, val_skipped = _evaluate_heads(backbone, head, val_loader, device)
            entry["val_top1"], entry["val_top5"] = top1, top5
        history.append(entry)
        log(f"epoch {epoch + 1}/{cfg.epochs} loss {[round(v, 4) for v in entry['train_loss']]}"
            + (f" val top1 {[round(v, 2) for v in top1]}" if 'val_top1' in entry else ""))
    best_top1, best_top5, best_epoch = best_per_head(history, len(lrs))
    best = max(range(len(lrs)), key=lambda i: (best_top1[i], -best_epoch[i], -i))
    rows = [
        {"base_lr": base, "lr": lr, "top1": best_top1[i], "top5": best_top5[i] if num_classes > 5 else None,
         "best_epoch": best_epoch[i], "final_top1": top1[i], "final_train_loss": history[-1]["train_loss"][i]}
        for i, (base, lr) in enumerate(zip(cfg.base_lrs, lrs))
    ]
    log(f"best: base lr {cfg.base_lrs[best]:g} (lr {lrs[best]:g}) at epoch {best_epoch[best]}: "
        f"top1 {best_top1[best]:.2f}% (that lr at the last epoch: {top1[best]:.2f}%)")
    return {
        "protocol": "paper",
        "config": asdict(cfg),
        "num_classes": num_classes,
        "class_names": list(train.class_names),
        "train_images": len(train),
        "val_images": val_seen,
        "per_lr": rows,
        "selected": {"base_lr": cfg.base_lrs[best], "lr": lrs[best], "epoch": best_epoch[best],
                     "selected_on": "val, best over base lrs and evaluations"},
        # the official number: best val top-1 over base lrs and evaluations (top-5 of that evaluation)
        "top1": best_top1[best],
        "top5": rows[best]["top5"],
        "final_top1": top1[best],  # the selected lr's top-1 at the last epoch
        "final_top5": top5[best] if num_classes > 5 else None,
        "history": history,
        "train_skipped": sorted(skipped),
        "val_skipped": [val.path(i) for i in val_skipped],
        "probe_seconds": time.perf_counter() - start,
    }
