"""Decoded images to what leaves the device: uint8 ``[N, S, S, 3]``, resized on the device.

Shared by the diffusers backend (pipeline output) and its own denoising loop (VAE output), so
neither imports the other for it.
"""

from __future__ import annotations

import numpy as np


def to_uint8_hwc(images, size: int, device):
    """Pipeline output (float [N, 3, H, W] in [0, 1], or numpy/PIL) -> uint8 [N, size, size, 3] on ``device``."""
    import torch
    import torch.nn.functional as F

    if isinstance(images, list):
        images = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).to(device).permute(0, 3, 1, 2)
    images = images.float()
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    images = torch.nan_to_num(images, nan=0.0).clamp(0, 1).mul(255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).contiguous()
