"""Small ImageFolders written with PIL for the evaluation tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (200, 40, 40), "blue": (40, 40, 200), "green": (40, 190, 40), "yellow": (210, 200, 40),
           "purple": (150, 40, 170), "gray": (128, 128, 128)}


def colour_image(rng: np.random.Generator, colour: tuple[int, int, int], size: int = 32) -> Image.Image:
    """A noisy patch of one colour: uint8 [size, size, 3]."""
    base = np.array(colour, dtype=np.float32)[None, None, :]
    noise = rng.normal(0.0, 40.0, size=(size, size, 3)).astype(np.float32)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def write_colour_folder(root: Path, per_class: int, seed: int, classes=("red", "blue"), size: int = 32,
                        label_of=None) -> Path:
    """Write ``per_class`` images of each colour to ``root/<label>/``.

    ``label_of(colour, i)`` names the folder an image goes to (default: its colour), which lets a test
    write images under labels unrelated to their content.
    """
    rng = np.random.default_rng(seed)
    for colour in classes:
        for i in range(per_class):
            label = colour if label_of is None else label_of(colour, i)
            folder = root / label
            folder.mkdir(parents=True, exist_ok=True)
            colour_image(rng, COLOURS[colour], size).save(folder / f"{colour}_{seed}_{i:03d}.png")
    return root
