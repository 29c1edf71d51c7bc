"""``--preview FILE.png``: a labelled grid of caption groups, one row per caption."""
from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from protocol import Group

LABEL_WIDTH = 260
PADDING = 4
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (20, 20, 20)


def _thumbnail(image: np.ndarray, size: int) -> Image.Image:
    picture = Image.fromarray(np.ascontiguousarray(image))
    if picture.size != (size, size):
        picture = picture.resize((size, size), Image.Resampling.BICUBIC)
    return picture


def group_images(group: Group) -> list[np.ndarray]:
    """A group's images as uint8 ``[H, W, 3]`` arrays, decoding encoded (png/jpeg/webp) groups."""
    if group.images is not None:
        return list(group.images)
    return [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in group.encoded or []]


def preview_image(groups: Sequence[Group], thumb_size: int = 96, max_images: int = 10) -> Image.Image:
    """The grid as a PIL image: per row the caption id + caption text, then up to ``max_images`` images."""
    if not groups:
        raise ValueError("preview needs at least one group")
    columns = min(max_images, max(g.num_images for g in groups))
    row_height = thumb_size + 2 * PADDING
    width = LABEL_WIDTH + columns * (thumb_size + PADDING) + PADDING
    grid = Image.new("RGB", (width, row_height * len(groups)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    wrap = max(10, (LABEL_WIDTH - 2 * PADDING) // 7)
    lines_fit = max(1, (row_height - 2 * PADDING) // 12)
    for row, group in enumerate(groups):
        top = row * row_height
        label = textwrap.wrap(f"#{group.caption_id}: {group.caption}", wrap)[:lines_fit]
        draw.multiline_text((PADDING, top + PADDING), "\n".join(label), fill=TEXT_COLOUR, font=font, spacing=2)
        for column, image in enumerate(group_images(group)[:columns]):
            left = LABEL_WIDTH + column * (thumb_size + PADDING)
            grid.paste(_thumbnail(image, thumb_size), (left, top + PADDING))
    return grid


def write_preview(groups: Sequence[Group], path: str | Path, thumb_size: int = 96, max_images: int = 10) -> Path:
    """Save ``preview_image(groups)`` to ``path`` (format from the suffix, e.g. .png)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    preview_image(groups, thumb_size, max_images).save(path)
    return path
