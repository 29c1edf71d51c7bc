"""Preprocessing and frozen-feature extraction shared by the linear and few-shot protocols."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import transforms

from trainer.eval.backbones import EvalBackbone
from trainer.eval.imagefolder import ImageFolderDataset, collate_skipping


#: resizing of the probe views: bilinear, torchvision's default that the official main_linear.py uses
PROBE_INTERPOLATION = transforms.InterpolationMode.BILINEAR


def eval_transform(backbone: EvalBackbone) -> transforms.Compose:
    """Resize(256/224 * S, bilinear) + CenterCrop(S) + normalize: the official evaluation view."""
    size = backbone.input_size
    return transforms.Compose([
        transforms.Resize(int(round(size * 256 / 224)), interpolation=PROBE_INTERPOLATION),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(backbone.mean, backbone.std),
    ])


def train_transform(backbone: EvalBackbone) -> transforms.Compose:
    """RandomResizedCrop(S, bilinear) + horizontal flip + normalize: the official linear-probe training view."""
    size = backbone.input_size
    return transforms.Compose([
        transforms.RandomResizedCrop(size, interpolation=PROBE_INTERPOLATION),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(backbone.mean, backbone.std),
    ])


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def make_loader(dataset, batch_size: int, workers: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False):
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate_skipping,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        generator=generator,
        persistent_workers=workers > 0,
    )


@dataclass
class FeatureSet:
    """features: float32 ``[N, D]`` (CPU); labels: int64 ``[N]``; skipped: paths that could not be decoded."""

    features: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    skipped: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _cache_key(backbone: EvalBackbone, dataset: ImageFolderDataset) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(backbone.describe(), sort_keys=True, default=str).encode())
    digest.update(f"fp32 {dataset.transform!r}".encode())  # the preprocessing: features cached before it changed do not match
    source = Path(backbone.source)
    if source.exists():
        stat = source.stat()
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    for path, label in dataset.samples:
        stat = path.stat()
        digest.update(f"{path}:{label}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


@torch.no_grad()
def extract_features(
    backbone: EvalBackbone,
    dataset: ImageFolderDataset,
    device: torch.device,
    batch_size: int = 256,
    workers: int = 0,
    cache_dir: str | Path | None = None,
) -> FeatureSet:
    """Run the frozen backbone once over ``dataset`` (whose transform should be deterministic).

    With ``cache_dir``, features are stored under a key of backbone + file list (sizes, mtimes) and
    reused by later calls.
    """
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"features-{_cache_key(backbone, dataset)}.pt"
        if cache_file.exists():
            cached = torch.load(cache_file, map_location="cpu", weights_only=True)
            return FeatureSet(cached["features"], cached["labels"], list(cached["class_names"]),
                              list(cached["skipped"]))
    backbone.model.to(device).eval()
    feats, labels, skipped = [], [], []
    for batch in make_loader(dataset, batch_size, workers):
        skipped.extend(dataset.path(i) for i in batch.skipped)
        if batch.labels.numel() == 0:
            continue
        out = backbone.features(batch.images.to(device, non_blocking=True))  # fp32, as the official probe
        feats.append(out.float().cpu())
        labels.append(batch.labels)
    if not feats:
        raise ValueError(f"no decodable image in {dataset.root} ({len(skipped)} unreadable files)")
    result = FeatureSet(torch.cat(feats), torch.cat(labels), list(dataset.class_names), skipped)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        torch.save({"features": result.features, "labels": result.labels,
                    "class_names": result.class_names, "skipped": result.skipped}, tmp)
        tmp.replace(cache_file)
    return result
