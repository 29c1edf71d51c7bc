"""One-call evaluations from folders: what ``stablerep-eval`` and the demo run."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from trainer.eval.backbones import EvalBackbone
from trainer.eval.features import FeatureSet, eval_transform, extract_features, train_transform
from trainer.eval.fewshot import FewShotConfig, fewshot_eval
from trainer.eval.imagefolder import ImageFolderDataset
from trainer.eval.knn import KnnConfig, knn_eval
from trainer.interrupts import Progress
from trainer.eval.linear import FastProbeConfig, PaperProbeConfig, fast_linear_probe, paper_linear_probe


def split_features(
    backbone: EvalBackbone,
    train_dir: str | Path,
    val_dir: str | Path,
    device: torch.device,
    batch_size: int = 256,
    workers: int = 0,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> tuple[FeatureSet, FeatureSet]:
    """Eval-view features of two ImageFolders; val's labels follow train's class order.
    ``progress`` (optional) learns which split is being embedded."""
    progress = progress or Progress()
    train = ImageFolderDataset(train_dir, eval_transform(backbone))
    val = ImageFolderDataset(val_dir, eval_transform(backbone), classes=train.class_names)
    progress.enter("features", f"{len(train)} training images")
    train_feats = extract_features(backbone, train, device, batch_size, workers, cache_dir)
    progress.enter("features", f"{len(val)} held-out images")
    return train_feats, extract_features(backbone, val, device, batch_size, workers, cache_dir)


def linear_probe(
    backbone: EvalBackbone,
    train_dir: str | Path,
    val_dir: str | Path,
    config: FastProbeConfig | PaperProbeConfig,
    device: torch.device,
    batch_size: int = 256,
    workers: int = 0,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Linear probe of ``backbone`` trained on ``train_dir`` and scored on ``val_dir`` (ImageFolders).

    ``FastProbeConfig`` -> features extracted once with the eval view, grid on cached features;
    ``PaperProbeConfig`` -> augmented views through the frozen backbone every epoch.
    ``progress`` learns the phase ("features", "probe") for a caller that reports where a stop came.
    """
    start = time.perf_counter()
    progress = progress or Progress()
    if isinstance(config, PaperProbeConfig):
        train = ImageFolderDataset(train_dir, train_transform(backbone))
        val = ImageFolderDataset(val_dir, eval_transform(backbone), classes=train.class_names)
        progress.enter("probe", f"paper protocol, {config.epochs} epochs")

        def log_epoch(message: str) -> None:
            if message.startswith("epoch "):
                progress.detail = f"paper protocol, {message.split(' loss')[0]} finished"
            log(message)

        result = paper_linear_probe(backbone, train, val, config, device, log=log_epoch)
    else:
        t0 = time.perf_counter()
        train_feats, val_feats = split_features(backbone, train_dir, val_dir, device, batch_size, workers, cache_dir,
                                                progress)
        extract_seconds = time.perf_counter() - t0
        progress.enter("probe", f"fast grid of {len(config.lrs) * len(config.weight_decays)} classifiers")
        result = fast_linear_probe(train_feats, val_feats, config, device)
        result["extract_seconds"] = extract_seconds
        result["train_skipped"] = train_feats.skipped
        result["val_skipped"] = val_feats.skipped
    result["skipped_images"] = len(result["train_skipped"]) + len(result["val_skipped"])
    result.update(backbone=backbone.describe(), train_dir=str(train_dir), val_dir=str(val_dir),
                  seconds=time.perf_counter() - start)
    return result


def fewshot_probe(
    backbone: EvalBackbone,
    data_dir: str | Path,
    config: FewShotConfig,
    device: torch.device,
    batch_size: int = 256,
    workers: int = 0,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Few-shot episodes over the classes of ``data_dir`` (an ImageFolder) on frozen features."""
    start = time.perf_counter()
    progress = progress or Progress()
    data = ImageFolderDataset(data_dir, eval_transform(backbone))
    progress.enter("features", f"{len(data)} images")
    feats = extract_features(backbone, data, device, batch_size, workers, cache_dir)
    progress.enter("episodes", f"{config.episodes} episodes")
    result = fewshot_eval(feats, config, device)
    result.update(backbone=backbone.describe(), data_dir=str(data_dir), skipped_images=len(feats.skipped),
                  seconds=time.perf_counter() - start)
    return result


def knn_probe(
    backbone: EvalBackbone,
    train_dir: str | Path,
    val_dir: str | Path,
    config: KnnConfig,
    device: torch.device,
    batch_size: int = 256,
    workers: int = 0,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Weighted k-NN of ``val_dir`` images against ``train_dir`` images (ImageFolders), eval view."""
    start = time.perf_counter()
    train_feats, val_feats = split_features(backbone, train_dir, val_dir, device, batch_size, workers, cache_dir)
    extract_seconds = time.perf_counter() - start
    result = knn_eval(train_feats, val_feats, config, device)
    result.update(backbone=backbone.describe(), train_dir=str(train_dir), val_dir=str(val_dir),
                  train_skipped=train_feats.skipped, val_skipped=val_feats.skipped,
                  skipped_images=len(train_feats.skipped) + len(val_feats.skipped),
                  extract_seconds=extract_seconds, seconds=time.perf_counter() - start)
    return result
