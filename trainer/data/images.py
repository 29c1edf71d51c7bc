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


def decode_image_of_size(data: bytes, height: int, width: int) -> np.ndarray:
    """Decode one image that must be ``width`` x ``height``: RGB uint8 ``[height, width, 3]``.

    The size is read from the image's header and checked *before* any pixel is decoded, so an
    image that announces more pixels (a decompression bomb) costs nothing. Raises ``ValueError``
    naming what is wrong (undecodable bytes, another size).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.size != (width, height):
                raise ValueError(f"is {image.size[0]}x{image.size[1]}, expected {width}x{height}")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except ValueError:
        raise
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ValueError(f"cannot be decoded ({type(exc).__name__}: {str(exc)[:120]})") from None
