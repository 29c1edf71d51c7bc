"""A small ImageFolder reader that reports bad input instead of crashing mid-run.

Layout: ``ROOT/<class name>/<image file>``; classes are the sorted sub-folder names. A missing
root, a root without class folders, or a class folder without images is an error naming the path;
an image that cannot be decoded is skipped and counted (``skipped`` lists the paths).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".ppm", ".tif", ".tiff", ".gif")


class ImageFolderError(ValueError):
    """The folder does not have the ImageFolder layout; the message names the path."""


def scan_image_folder(
    root: str | Path, classes: Sequence[str] | None = None
) -> tuple[list[str], list[tuple[Path, int]]]:
    """List ``(path, class index)`` pairs under ``root``.

    Args:
        root: folder with one sub-folder per class.
        classes: class names fixing the label order (e.g. the training set's); every sub-folder of
            ``root`` must be one of them. ``None`` uses the sorted sub-folder names.
    Returns:
        (class names, samples sorted by class then file name).
    """
    root = Path(root)
    if not root.exists():
        raise ImageFolderError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise ImageFolderError(f"image folder {root} is not a directory")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise ImageFolderError(f"image folder {root} has no class sub-folders (expected ROOT/<class>/<image>)")
    if classes is None:
        classes = found
    else:
        classes = list(classes)
        unknown = [name for name in found if name not in classes]
        if unknown:
            raise ImageFolderError(
                f"image folder {root} has class folders {unknown} that are not among the training classes {classes}"
            )
    index = {name: i for i, name in enumerate(classes)}
    samples: list[tuple[Path, int]] = []
    for name in found:
        files = sorted(
            p for p in (root / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise ImageFolderError(
                f"class folder {root / name} has no image files (extensions {', '.join(IMAGE_EXTENSIONS)})"
            )
        samples.extend((p, index[name]) for p in files)
    return list(classes), samples


def balanced_subset(samples: Sequence[tuple[Path, int]], max_images: int, seed: int = 0) -> list[tuple[Path, int]]:
    """A class-balanced subset of ``samples`` of at most ``max_images`` (at least one per class).

    Every class keeps ``max(1, max_images // classes)`` of its samples (all of them when it has fewer),
    drawn by a generator seeded with ``seed`` and the class label: the same folder gives the same
    subset in every call and every run. The order of ``samples`` is kept. ``max_images <= 0``: all.
    """
    by_class: dict[int, list[int]] = {}
    for position, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(position)
    if max_images <= 0 or len(samples) <= max_images:
        return list(samples)
    quota = max(1, max_images // len(by_class))
    kept: list[int] = []
    for label, positions in by_class.items():
        kept.extend(positions if len(positions) <= quota else random.Random(f"{seed}:{label}").sample(positions, quota))
    return [samples[i] for i in sorted(kept)]


@dataclass
class ImageFolderDataset(torch.utils.data.Dataset):
    """Items are ``(image, label, index)``; ``image`` is ``None`` when the file cannot be decoded.

    Use :func:`collate_skipping` as the DataLoader's ``collate_fn``: it drops the undecodable items
    and returns their dataset indices, so callers can count and name skipped files.
    """

    root: str | Path
    transform: Callable | None = None
    classes: Sequence[str] | None = None
    class_names: list[str] = field(init=False)
    samples: list[tuple[Path, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.class_names, self.samples = scan_image_folder(self.root, self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def load(self, index: int) -> Image.Image | None:
        path, _ = self.samples[index]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError):
            return None

    def __getitem__(self, index: int):
        img = self.load(index)
        if img is not None and self.transform is not None:
            img = self.transform(img)
        return img, self.samples[index][1], index

    def path(self, index: int) -> str:
        return str(self.samples[index][0])


@dataclass
class LoadedBatch:
    """images: float ``[B, 3, S, S]``; labels, indices: int64 ``[B]``; skipped: dataset indices dropped."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: list[int]


def collate_skipping(items: list) -> LoadedBatch:
    """Stack the decodable items; record the positions of the undecodable ones."""
    good = [item for item in items if item[0] is not None]
    skipped = [int(item[2]) for item in items if item[0] is None]
    if not good:
        return LoadedBatch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped)
    images = torch.stack([item[0] for item in good])
    labels = torch.tensor([item[1] for item in good], dtype=torch.long)
    indices = torch.tensor([item[2] for item in good], dtype=torch.long)
    return LoadedBatch(images, labels, indices, skipped)


@dataclass(frozen=True)
class ProbeFolder:
    """A labelled probe: ``root/train/<class>/...`` and ``root/val/<class>/...`` with the same classes."""

    root: Path
    class_names: list[str]
    train_images: int
    val_images: int

    @property
    def name(self) -> str:
        return self.root.name


def scan_probe_folder(root: str | Path) -> ProbeFolder:
    """Check the train/val layout of a probe folder; an :class:`ImageFolderError` names what is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise ImageFolderError(f"probe folder {root} does not exist or is not a directory")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ImageFolderError(f"probe folder {root} has no {split}/ sub-folder (expected {root}/{split}/<class>/<image>)")
    classes, train = scan_image_folder(root / "train")
    if len(classes) < 2:
        raise ImageFolderError(f"probe folder {root}: train/ has {len(classes)} class ({classes}); a probe needs >= 2")
    val_classes, val = scan_image_folder(root / "val")
    if val_classes != classes:
        raise ImageFolderError(f"probe folder {root}: classes differ between train/ {classes} and val/ {val_classes}")
    return ProbeFolder(root, classes, len(train), len(val))
