"""The caption grammar of the procedural backend.

A caption names four attributes, one word each:

    a <colour> <shape> with <texture> on a <background> background

e.g. "a red triangle with stripes on a dark background", "an orange star with dots on a light
background". Matching is case-insensitive, extra whitespace and a final period are ignored, and
"a"/"an" are interchangeable. There are 8 colours x 6 shapes x 4 textures x 3 backgrounds = 576
distinct captions. The caption fixes these semantics; the image seed fixes the nuisance (position,
scale, rotation, pattern phase, lighting, background variation, pixel noise), so all images of a
caption are true positives of each other and every attribute is learnable from pixels.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from types import MappingProxyType

import numpy as np

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.10),
    "orange": (0.96, 0.55, 0.08),
    "yellow": (0.95, 0.88, 0.16),
    "green": (0.16, 0.68, 0.22),
    "cyan": (0.10, 0.78, 0.84),
    "blue": (0.14, 0.30, 0.90),
    "purple": (0.56, 0.22, 0.80),
    "pink": (0.96, 0.46, 0.70),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "hexagon", "star", "cross")
TEXTURES: tuple[str, ...] = ("stripes", "dots", "checks", "rings")
BACKGROUNDS: tuple[str, ...] = ("dark", "light", "gradient")

#: attribute name -> its values, in a fixed order (the order of class indices).
attributes = MappingProxyType(
    {"colour": tuple(COLOURS), "shape": SHAPES, "texture": TEXTURES, "background": BACKGROUNDS}
)
ATTRIBUTES = attributes

TEMPLATE = "a <colour> <shape> with <texture> on a <background> background"
_PATTERN = re.compile(r"^an? (\w+) (\w+) with (\w+) on an? (\w+) background$")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(colour: str, shape: str, texture: str, background: str) -> str:
    """The canonical caption text of one attribute combination."""
    parsed = {"colour": colour, "shape": shape, "texture": texture, "background": background}
    for name, value in parsed.items():
        if value not in attributes[name]:
            raise ValueError(f"unknown {name} {value!r}; known: {', '.join(attributes[name])}")
    return f"{_article(colour)} {colour} {shape} with {texture} on {_article(background)} {background} background"


def parse_caption(text: str) -> dict[str, str]:
    """``{"colour", "shape", "texture", "background"}`` of a caption; ValueError naming it if it does not parse."""
    if not isinstance(text, str):
        raise ValueError(f"caption must be a string, got {type(text).__name__}")
    normal = " ".join(text.lower().split()).rstrip(".").strip()
    match = _PATTERN.match(normal)
    if match is None:
        raise ValueError(
            f"caption {text!r} does not follow the procedural grammar {TEMPLATE!r} "
            f"(e.g. {make_caption('red', 'triangle', 'stripes', 'dark')!r})"
        )
    parsed = dict(zip(("colour", "shape", "texture", "background"), match.groups()))
    for name, value in parsed.items():
        if value not in attributes[name]:
            raise ValueError(
                f"caption {text!r}: unknown {name} {value!r}; known {name}s: {', '.join(attributes[name])}"
            )
    return parsed


def all_captions() -> list[str]:
    """Every caption of the grammar (576), in a fixed order."""
    return [make_caption(*combo) for combo in itertools.product(*attributes.values())]


def sample_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` captions: successive seeded permutations of all 576 captions.

    The first 576 are all distinct; beyond that each caption repeats once per further 576.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    pool = all_captions()
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        out.extend(pool[i] for i in rng.permutation(len(pool)))
    return out[:n]


def write_caption_file(path: str | Path, n: int, seed: int = 0) -> Path:
    """Write ``sample_captions(n, seed)`` to ``path``: .txt (one per line) or .csv (column ``caption``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".csv"):
        raise ValueError(f"{path}: caption files are written as .txt or .csv, not {suffix or 'no suffix'!r}")
    captions = sample_captions(n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        if suffix == ".csv":
            handle.write("caption\n")
        handle.writelines(f"{caption}\n" for caption in captions)
    temporary.replace(path)
    return path
