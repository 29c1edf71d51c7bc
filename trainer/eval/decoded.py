"""Probe folders decoded once into uint8 tensors at the model's input, and their batched embedding.

What a repeated evaluation of a changing backbone on fixed images needs (the trainer's monitor):
the PNG decode, resize and centre crop of ``stablerep-eval``'s eval view happen once
(:func:`decode_split`); each evaluation then only normalizes uint8 batches on the device and runs
the backbone (:func:`embed_split`), which gives the features :func:`extract_features` gives on the
same folder (same crop, same normalization, fp32).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import transforms

from trainer.eval.backbones import EvalBackbone
from trainer.eval.features import FeatureSet, eval_transform, make_loader
from trainer.eval.imagefolder import ImageFolderDataset, balanced_subset


@dataclass
class DecodedSplit:
    """One split of a probe, decoded once: ``images`` uint8 ``[N, 3, S, S]`` (resized and centre-cropped
    as ``stablerep-eval``'s eval view), ``labels`` int64 ``[N]``, ``paths`` the ``N`` files,
    ``skipped`` the files that could not be decoded, ``files`` the image files of the folder (more than
    ``N + len(skipped)`` when a subset was drawn)."""

    root: Path
    class_names: list[str]
    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    skipped: list[str]
    files: int

    def __len__(self) -> int:
        return len(self.labels)


def decode_split(root: Path, backbone: EvalBackbone, classes: list[str] | None = None,
                 max_images: int = 0) -> DecodedSplit:
    """Decode the images under ``root`` (an ImageFolder) once into a :class:`DecodedSplit`: all of them,
    or with ``max_images > 0`` the class-balanced subset :func:`balanced_subset` draws (seed 0)."""
    view = eval_transform(backbone).transforms  # [Resize, CenterCrop, ToTensor, Normalize]
    folder = ImageFolderDataset(root, transforms.Compose([*view[:2], transforms.PILToTensor()]), classes=classes)
    files = len(folder)
    folder.samples = balanced_subset(folder.samples, max_images)
    images, labels, paths, skipped = [], [], [], []
    for batch in make_loader(folder, batch_size=256, workers=0):
        skipped.extend(folder.path(i) for i in batch.skipped)
        if batch.labels.numel():
            images.append(batch.images)
            labels.append(batch.labels)
            paths.extend(folder.path(int(i)) for i in batch.indices)
    if not images:
        raise ValueError(f"no decodable image in {root} ({len(skipped)} unreadable files)")
    return DecodedSplit(Path(root), list(folder.class_names), torch.cat(images), torch.cat(labels), paths, skipped,
                        files)


def embed_split(backbone: EvalBackbone, split: DecodedSplit, device: torch.device, batch_size: int = 256) -> FeatureSet:
    """Features float32 ``[N, D]`` (CPU) of ``split``'s images through the frozen backbone, in eval mode
    (the caller restores the model's mode). uint8 batches go to ``device`` and are normalized there with
    the backbone's mean and std (the arithmetic of ``transforms.Normalize``), channels-last."""
    backbone.model.eval()
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1)
    feats = []
    with torch.inference_mode():
        for start in range(0, len(split), batch_size):
            batch = split.images[start:start + batch_size].to(device, non_blocking=True)
            x = batch.float().div_(255).sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)
            feats.append(backbone.features(x).float().cpu())
    # concatenated outside inference mode: a normal tensor, usable as the linear probe's input
    return FeatureSet(torch.cat(feats), split.labels.clone(), list(split.class_names), list(split.skipped))
