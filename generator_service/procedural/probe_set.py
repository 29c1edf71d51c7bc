"""Labelled procedural images for a linear probe, as torchvision ImageFolder trees.

``write_probe_imagefolder(out_dir, attribute="shape", ...)`` writes

    out_dir/train/<value>/<index>.png     images_per_class_train per value of `attribute`
    out_dir/val/<value>/<index>.png       images_per_class_val per value
    out_dir/probe.json                    attribute, classes, counts, size, seed

Each image has a random caption with the class's value for `attribute` (other attributes drawn
from ``seed``). Image seeds are ``2**63 + image_seed(seed, key, index)``: at least 2**63, so they
never equal a training seed (`generator_service.seeds.image_seed` gives values below 2**63), and
train and val use different keys, so the two splits share no seed either.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from generator_service.procedural.grammar import attributes, make_caption
from generator_service.procedural.render import render
from generator_service.seeds import image_seed

PROBE_SEED_OFFSET = 2**63
_SPLITS = {"train": 0, "val": 1}


def probe_seed(seed: int, split: str, class_index: int, index: int) -> int:
    """The seed of image ``index`` of class ``class_index`` in ``split``; always >= 2**63."""
    key = (_SPLITS[split] << 16) | class_index
    return PROBE_SEED_OFFSET + image_seed(seed, key, index)


def write_probe_imagefolder(
    out_dir: str | Path,
    attribute: str = "shape",
    images_per_class_train: int = 50,
    images_per_class_val: int = 20,
    size: int = 64,
    seed: int = 0,
    batch_size: int = 256,
) -> dict:
    """Write the train/ and val/ ImageFolder trees; returns the summary also saved as probe.json."""
    if attribute not in attributes:
        raise ValueError(f"unknown attribute {attribute!r}; known: {', '.join(attributes)}")
    for name, count in (("images_per_class_train", images_per_class_train), ("images_per_class_val", images_per_class_val)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{name} must be a positive integer, got {count!r}")
    out_dir = Path(out_dir)
    classes = list(attributes[attribute])
    others = [name for name in attributes if name != attribute]
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", images_per_class_train), ("val", images_per_class_val)):
        jobs = []  # (path, attributes, seed)
        for class_index, value in enumerate(classes):
            folder = out_dir / split / value
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                attrs = {name: attributes[name][rng.integers(len(attributes[name]))] for name in others}
                attrs[attribute] = value
                jobs.append((folder / f"{index:06d}.png", attrs, probe_seed(seed, split, class_index, index)))
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            images = render([attrs for _, attrs, _ in chunk], [s for _, _, s in chunk], size, size)
            for (path, _, _), image in zip(chunk, images):
                Image.fromarray(image).save(path)
    summary = {
        "attribute": attribute,
        "classes": classes,
        "train_per_class": images_per_class_train,
        "val_per_class": images_per_class_val,
        "size": size,
        "seed": seed,
        "example_caption": make_caption(**{name: attributes[name][0] for name in attributes}),
    }
    (out_dir / "probe.json").write_text(json.dumps(summary, indent=2))
    return summary
