"""The trainer's one image decoder: encoded bytes (PNG / JPEG / WebP) -> uint8 ``[S, S, 3]``."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

#: Largest decoded image accepted, in pixels (PIL's decompression-bomb guard raises beyond twice this).
MAX_IMAGE_PIXELS = 8192 * 8192


def decode_image(data: bytes, size: int | None = None) -> np.ndarray:
    """Decode one image to RGB uint8 ``[H, W, 3]``.

    With ``size``, an image of another size is resized (shorter side, bicubic) and center-cropped
    to ``[size, size, 3]``. Raises whatever PIL raises for undecodable bytes (callers name the image).
    """
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        if size is not None and image.size != (size, size):
            image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
        return np.asarray(image, dtype=np.uint8)
