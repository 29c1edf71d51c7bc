"""Batched GPU augmentation: the paper's SimCLR-style recipe on uint8 caption-group images.

``GPUAugment(size)(images uint8 [N, H, W, 3]) -> float [N, 3, size, size]`` (ImageNet-normalized).
Every sample draws its own parameters; there is no per-image Python loop and no host sync:

1. (optional) downsample the whole image to ``downsample`` px (antialiased bilinear); (optional, the
   official ``DownSampleAndUpsample``) with probability ``down_prob`` per image, shrink its shorter side
   to one of ``down_res`` (chosen uniformly) and resize it back to the input size;
2. RandomResizedCrop + horizontal flip as ONE ``F.grid_sample`` with a per-sample affine grid
   (crop box and flip folded into the grid; bilinear, half-pixel centers, no antialias: crops are at
   most ``H / size`` times larger than the output, 1.14x for 256 -> 224);
3. (strong) colour ops at output size on the crop, in this fixed order, each sample with its own
   factors and identity factors where a sample skips a step: ColorJitter with p=0.8 (brightness,
   contrast, saturation, hue; torchvision's formulas, in a random order drawn per image as
   torchvision's ColorJitter does),
   grayscale with p=0.2, Gaussian blur with p=0.5 and sigma ~ U(0.1, 2) (separable, reflect padding,
   13 taps, grouped convolution with one kernel per sample);
4. ImageNet normalization, written in ``out_dtype``.

On CUDA the work runs in float16 (values in [0, 1]); on CPU in float32.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.augment_config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


@dataclass
class AugmentParams:
    """Per-sample parameters; every field is a tensor with leading dimension N.

    crop: float ``[N, 4]`` = (top, left, height, width) in pixels of the (downsampled) input.
    flip: bool ``[N]``. brightness, contrast, saturation: float ``[N]`` (1 = unchanged).
    hue: float ``[N]`` (0 = unchanged). gray: bool ``[N]``. blur_sigma: float ``[N]`` (0 = no blur).
    jitter_order: int64 ``[N, 4]``, a permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue)
    per sample, or None for that fixed order. down: int64 ``[N]``, index into ``down_res`` of the
    sample's down-and-up resize, -1 = none; None = no sample. jitter_balanced: the first
    ``jitter_balanced`` samples (a multiple of 24) hold every one of the 24 orders once per block of
    24 (`balanced_orders`), so each op is at each position for exactly a quarter of them.
    """

    crop: torch.Tensor
    flip: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    gray: torch.Tensor
    blur_sigma: torch.Tensor
    jitter_order: torch.Tensor | None = None
    down: torch.Tensor | None = None
    jitter_balanced: int = 0

    def to(self, device: torch.device | str) -> "AugmentParams":
        return AugmentParams(**{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                                for k, v in self.__dict__.items()})


# ----------------------------------------------------------------------------------- colour ops
def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` -> ``[N, 1, H, W]`` luma (torchvision weights)."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _per_sample(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return factor.to(x.dtype).view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x * factor`` clamped to [0, 1]. x float ``[N, 3, H, W]`` in [0, 1]; factor ``[N]``."""
    return (x * _per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with each image's mean luma: ``mean + factor * (x - mean)``, clamped. factor ``[N]``."""
    mean = rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True, dtype=torch.float32).to(x.dtype)
    return torch.lerp(mean.expand_as(x), x, _per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the per-pixel luma: ``gray + factor * (x - gray)``, clamped. factor ``[N]``."""
    gray = rgb_to_gray(x)
    return torch.lerp(gray.expand_as(x), x, _per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` (fraction of a turn, ``[N]``), keeping S and V.

    RGB -> H as torchvision computes it; back to RGB with the closed form
    ``c_n = V - V*S * clamp(min(k_n, 4 - k_n), 0, 1)``, ``k_n = (n + 6H) mod 6``, n = 5, 3, 1 for R, G, B
    (V = max, V*S = max - min, so only H is recomputed).
    """
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    hue6 = torch.where(is_r, bc - gc, torch.where(is_g, 2.0 + rc - bc, 4.0 + gc - rc))  # in [-1, 5)
    hue6 = torch.remainder(hue6 + 6.0 * shift.to(x.dtype).view(-1, 1, 1), 6.0)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(hue6 + n, 6.0)
        channels.append(maxc - chroma * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(channels, dim=1)


def grayscale_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Replace the images selected by ``mask`` ``[N]`` with their luma on all three channels."""
    return torch.where(mask.view(-1, 1, 1, 1), rgb_to_gray(x).expand_as(x), x)


BLUR_SIGMA_RANGE = (0.1, 2.0)
BLUR_KERNEL_SIZE = 2 * math.ceil(3 * BLUR_SIGMA_RANGE[1]) + 1  # 13


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int = BLUR_KERNEL_SIZE) -> torch.Tensor:
    """One normalized 1-D Gaussian per sample: sigma ``[N]`` -> ``[N, kernel_size]``; sigma 0 -> identity."""
    half = (kernel_size - 1) / 2
    taps = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=torch.float32)
    s = sigma.float().clamp(min=1e-6).unsqueeze(1)
    kernels = torch.exp(-0.5 * (taps / s) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    identity = (taps == 0).float().expand_as(kernels)
    return torch.where((sigma > 0).unsqueeze(1), kernels, identity)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int = BLUR_KERNEL_SIZE) -> torch.Tensor:
    """Separable per-sample Gaussian blur with reflect padding. x ``[N, C, H, W]``, sigma ``[N]``."""
    n, c, h, w = x.shape
    k = gaussian_kernels(sigma, kernel_size).to(x.dtype).repeat_interleave(c, dim=0)  # [N*C, k]
    pad = kernel_size // 2
    planes = x.reshape(1, n * c, h, w)
    planes = F.conv2d(F.pad(planes, (0, 0, pad, pad), mode="reflect"), k.view(n * c, 1, kernel_size, 1),
                      groups=n * c)
    planes = F.conv2d(F.pad(planes, (pad, pad, 0, 0), mode="reflect"), k.view(n * c, 1, 1, kernel_size),
                      groups=n * c)
    return planes.view(n, c, h, w)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
#: the 24 orders of the four jitter ops, ``[24, 4]``
JITTER_ORDERS = torch.tensor(list(itertools.permutations(range(4))), dtype=torch.int64)


def balanced_orders(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Jitter orders ``[n, 4]``: each sample's order uniform over the 24, as torchvision draws it, but
    stratified: every block of 24 samples holds each order once (in random order within the block).

    So at every position each op is applied to exactly a quarter of the first ``24 * (n // 24)``
    samples: :func:`color_jitter` runs each op once on those rows, with shapes fixed by ``n``.
    """
    blocks = -(-n // 24)
    picks = torch.rand(blocks, 24, generator=generator, device=device).argsort(dim=1).flatten()[:n]
    return JITTER_ORDERS.to(device)[picks]


def _jitter_sorted(x: torch.Tensor, order: torch.Tensor, factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Balanced rows (``order`` from :func:`balanced_orders`, ``x`` ``[M, 3, H, W]``, M a multiple of 24):
    at each position, the rows sorted by the op they apply there, each op run once on its quarter.

    Device-side sorts and gathers only (no host sync; every shape depends on M alone): per position one
    gather into that position's sorted layout and four ops on contiguous quarters, then one gather back.
    """
    m = x.shape[0]
    quarter = m // 4
    rows = torch.arange(m, device=x.device)
    where = rows  # where[i]: the original row now at position i of x
    for k in range(4):
        perm = order[:, k].argsort(stable=True)  # original rows, grouped by their op at position k
        inverse = torch.empty_like(where).scatter_(0, where, rows)  # original row -> its position in x
        x = x.index_select(0, inverse[perm])
        where = perm
        x = torch.cat([op(x[o * quarter:(o + 1) * quarter], factor[perm[o * quarter:(o + 1) * quarter]])
                       for o, (op, factor) in enumerate(zip(_JITTER_OPS, factors))])
    return x.index_select(0, torch.empty_like(where).scatter_(0, where, rows))


def color_jitter(x: torch.Tensor, params: AugmentParams, sorted_ops: bool | None = None) -> torch.Tensor:
    """Brightness, contrast, saturation and hue with each sample's factors, in each sample's order.

    ``params.jitter_order`` ``[N, 4]`` gives the op at every position per sample (None = the fixed order
    0..3). x float ``[N, 3, H, W]`` in [0, 1]; computed in float32, returned in x's dtype. Three ways,
    none with a per-image loop:

    - on the host: each op on the rows that apply it at position k (index lists; reading them back
      costs nothing there): one pass of work per op;
    - off the host, on the ``params.jitter_balanced`` leading rows (``sorted_ops``, the default there):
      :func:`_jitter_sorted`, one pass per op, no host sync, static shapes;
    - off the host, on other rows (at most 23 of a batch): every op on all of them at each position,
      identity factors where a sample does not apply it there, selected with masks.
    """
    factors = (params.brightness, params.contrast, params.saturation, params.hue)
    if params.jitter_order is None:
        for op, factor in zip(_JITTER_OPS, factors):
            x = op(x, factor)
        return x
    dtype, x = x.dtype, x.float()  # float32: a half hue step before contrast amplifies its rounding
    sorted_ops = x.device.type != "cpu" if sorted_ops is None else sorted_ops
    balanced = params.jitter_balanced if sorted_ops else 0
    if balanced:
        head = _jitter_sorted(x[:balanced], params.jitter_order[:balanced], tuple(f[:balanced] for f in factors))
        if balanced == x.shape[0]:
            return head.to(dtype)
        tail = _jitter_masked(x[balanced:], params.jitter_order[balanced:], tuple(f[balanced:] for f in factors))
        return torch.cat([head, tail]).to(dtype)
    if x.device.type == "cpu" and not sorted_ops:
        # On the host, run each op only on the samples that apply it at position k (4 passes of work in
        # all, as for the fixed order); the index lists cost nothing to read back here.
        x = x.clone()
        for k in range(4):
            for o, (op, factor) in enumerate(zip(_JITTER_OPS, factors)):
                rows = (params.jitter_order[:, k] == o).nonzero().squeeze(1)
                if rows.numel():
                    x[rows] = op(x[rows], factor[rows])
        return x.to(dtype)
    return _jitter_masked(x, params.jitter_order, factors).to(dtype)


def _jitter_masked(x: torch.Tensor, order: torch.Tensor, factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Masks instead of index lists: no host sync; every op runs on all rows at each position, with
    identity factors (brightness/contrast/saturation 1, hue 0) on the rows that do not apply it there."""
    for k in range(4):
        for o, (op, factor) in enumerate(zip(_JITTER_OPS, factors)):
            here = order[:, k] == o
            identity = torch.zeros_like(factor) if o == 3 else torch.ones_like(factor)
            applied = op(x, torch.where(here, factor, identity))
            x = torch.where(here.view(-1, 1, 1, 1), applied, x)
    return x


def down_up_where(x: torch.Tensor, down: torch.Tensor, down_res: tuple[int, ...]) -> torch.Tensor:
    """Official ``DownSampleAndUpsample`` per sample: shorter side to ``down_res[down[i]]`` and back.

    x float ``[N, C, H, W]``; down int ``[N]`` (-1 = unchanged). Resizes run on the whole batch once per
    resolution (antialiased bilinear down, bilinear up) and are selected per sample, without host sync.
    """
    _, _, height, width = x.shape
    for i, res in enumerate(down_res):
        small = (res, max(1, round(res * width / height))) if height <= width else (max(1, round(res * height / width)), res)
        shrunk = F.interpolate(x, size=small, mode="bilinear", antialias=True, align_corners=False)
        back = F.interpolate(shrunk, size=(height, width), mode="bilinear", align_corners=False)
        x = torch.where((down == i).view(-1, 1, 1, 1), back, x)
    return x


# ------------------------------------------------------------------------------------- sampling
def sample_crops(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                 generator: torch.Generator | None, device: torch.device, attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes as torchvision draws them, for ``n`` samples at once.

    Up to ``attempts`` (area, log-ratio) draws per sample, the first that fits wins; otherwise the
    center crop with the ratio clamped into range. Returns float ``[n, 4]`` = (top, left, h, w).
    """
    area = height * width
    u = torch.rand(n, attempts, 2, generator=generator, device=device)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fb_w, fb_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fb_w, fb_h = round(height * ratio[1]), height
    else:
        fb_w, fb_h = width, height
    found = fits.any(dim=1)
    w = torch.where(found, w, torch.full_like(w, fb_w))
    h = torch.where(found, h, torch.full_like(h, fb_h))
    pos = torch.rand(n, 2, generator=generator, device=device)
    top = torch.where(found, torch.floor(pos[:, 0] * (height - h + 1)), torch.floor((height - h) / 2))
    left = torch.where(found, torch.floor(pos[:, 1] * (width - w + 1)), torch.floor((width - w) / 2))
    return torch.stack([top, left, h, w], dim=1)


def crop_flip_resize(x: torch.Tensor, crop: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each sample's box, flip where asked, resize to ``size``: one bilinear ``grid_sample``.

    x float ``[N, C, H, W]`` (any memory format); crop ``[N, 4]`` (top, left, h, w); flip bool ``[N]``.
    Returns ``[N, C, size, size]``.
    """
    n, c, height, width = x.shape
    top, left, h, w = crop.to(torch.float32).unbind(1)
    sx = (w / width) * torch.where(flip, -1.0, 1.0)
    sy = h / height
    cx = (2 * left + w) / width - 1
    cy = (2 * top + h) / height - 1
    zeros = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zeros, cx], 1), torch.stack([zeros, sy, cy], 1)], 1)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# -------------------------------------------------------------------------------------- pipeline
class GPUAugment:
    """The paper's augmentation for a whole batch on its own device.

    Args:
        size: output side in pixels.
        strong: full recipe (crop, flip, colour jitter, grayscale, blur); False = crop + flip only.
        scale, ratio: RandomResizedCrop area fraction and aspect-ratio ranges.
        downsample: first resize inputs to this side (the paper's low-resolution ablation), or None.
        down_res, down_prob: the official random down-and-up resize: with probability ``down_prob``
            an image's shorter side goes to one of ``down_res`` (uniform choice) and back; () = off.
        crops_per_image: augmented crops the methods take of every drawn image (official num_crop).
        mean, std: normalization per channel.
        jitter: (brightness, contrast, saturation, hue) strengths; jitter_p, gray_p, blur_p,
        flip_p: probabilities (default: 0.5 with ``strong``, 0 without: the official weak
        augmentation is RandomResizedCrop only); blur_sigma: sigma range.
        dtype: working dtype (default float16 on CUDA, float32 elsewhere); out_dtype: output dtype.
        balanced_jitter: draw jitter orders stratified per 24 samples (`balanced_orders`), so the
            colour jitter runs each op once (default: off the host only; on the host the orders are
            drawn independently per sample, as torchvision does).
    """

    def __init__(self, size: int = 224, strong: bool = True, scale: tuple[float, float] = (0.08, 1.0),
                 downsample: int | None = None, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD, ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1), jitter_p: float = 0.8,
                 gray_p: float = 0.2, blur_p: float = 0.5,
                 blur_sigma: tuple[float, float] = BLUR_SIGMA_RANGE, flip_p: float | None = None,
                 down_res: tuple[int, ...] = (), down_prob: float = 0.05, crops_per_image: int = 1,
                 dtype: torch.dtype | None = None, out_dtype: torch.dtype = torch.float32,
                 balanced_jitter: bool | None = None) -> None:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
        if blur_sigma[1] > BLUR_SIGMA_RANGE[1]:
            raise ValueError(f"blur_sigma up to {BLUR_SIGMA_RANGE[1]} is supported, got {blur_sigma}")
        self.size, self.strong, self.scale, self.ratio = size, strong, tuple(scale), tuple(ratio)
        self.downsample = downsample
        self.mean, self.std = tuple(mean), tuple(std)
        self.jitter, self.jitter_p, self.gray_p, self.blur_p = tuple(jitter), jitter_p, gray_p, blur_p
        if not 0.0 <= down_prob <= 1.0 or any(int(r) <= 0 for r in down_res):
            raise ValueError(f"down_res must be sides > 0 and down_prob in [0, 1], got {down_res}, {down_prob}")
        self.blur_sigma = tuple(blur_sigma)
        self.flip_p = (0.5 if strong else 0.0) if flip_p is None else flip_p
        self.down_res, self.down_prob = tuple(int(r) for r in down_res), float(down_prob)
        if crops_per_image < 1:
            raise ValueError(f"crops_per_image must be >= 1, got {crops_per_image}")
        self.crops_per_image = int(crops_per_image)
        self.dtype, self.out_dtype = dtype, out_dtype
        self.balanced_jitter = balanced_jitter
        self._normalize_cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, augment: AugmentConfig, *, img_size: int, **kwargs) -> "GPUAugment":
        """The augmentation the ``augment`` config group describes, with crops of ``augment.size`` or,
        when unset, ``img_size`` (the model's input side) pixels; ``kwargs`` (``dtype``,
        ``balanced_jitter``, ...) go to the constructor."""
        return cls(size=augment.size or img_size, strong=augment.strong, scale=(augment.crop_scale_min(), 1.0),
                   downsample=augment.downsample, down_res=tuple(augment.down_res), down_prob=augment.down_prob,
                   crops_per_image=augment.crops_per_image, blur_p=augment.blur_p, **kwargs)

    def working_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return torch.float16 if device.type == "cuda" else torch.float32

    def sample_params(self, n: int, height: int, width: int, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> AugmentParams:
        """Draw parameters for ``n`` samples of an ``height x width`` input (after downsampling).

        Random numbers come from ``generator`` on its own device (else the default generator on
        ``device``); the result is moved to ``device``.
        """
        device = torch.device(device)
        gen_device = generator.device if generator is not None else device
        crop = sample_crops(n, height, width, self.scale, self.ratio, generator, gen_device)
        u = torch.rand(n, 11, generator=generator, device=gen_device)
        flip = u[:, 0] < self.flip_p
        ones, zeros = torch.ones(n, device=gen_device), torch.zeros(n, device=gen_device)
        balanced = 0  # leading samples with stratified jitter orders
        if self.strong:
            jit = u[:, 1] < self.jitter_p
            b, c, s, h = self.jitter
            brightness = torch.where(jit, 1 - b + 2 * b * u[:, 2], ones)
            contrast = torch.where(jit, 1 - c + 2 * c * u[:, 3], ones)
            saturation = torch.where(jit, 1 - s + 2 * s * u[:, 4], ones)
            hue = torch.where(jit, -h + 2 * h * u[:, 5], zeros)
            gray = u[:, 6] < self.gray_p
            lo, hi = self.blur_sigma
            blur_sigma = torch.where(u[:, 7] < self.blur_p, lo + (hi - lo) * u[:, 8], zeros)
            if self._balanced_jitter(device):  # each order uniform per sample, stratified per 24 samples
                order, balanced = balanced_orders(n, generator, gen_device), 24 * (n // 24)
            else:
                order = torch.rand(n, 4, generator=generator, device=gen_device).argsort(dim=1)
        else:
            brightness, contrast, saturation, hue = ones, ones, ones, zeros
            gray, blur_sigma = torch.zeros(n, dtype=torch.bool, device=gen_device), zeros
            order = None
        down = None
        if self.down_res:
            choice = (u[:, 10] * len(self.down_res)).long().clamp_(max=len(self.down_res) - 1)
            down = torch.where(u[:, 9] < self.down_prob, choice, torch.full_like(choice, -1))
        return AugmentParams(crop, flip, brightness, contrast, saturation, hue, gray, blur_sigma,
                             order, down, balanced).to(device)

    def _balanced_jitter(self, device: torch.device) -> bool:
        return self.balanced_jitter if self.balanced_jitter is not None else device.type != "cpu"

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Augment with given parameters: uint8 ``[N, H, W, 3]`` -> ``out_dtype`` ``[N, 3, size, size]``.

        Runs with autocast off, so a surrounding mixed-precision context does not change its dtypes.
        """
        device_type = images.device.type if images.device.type in ("cuda", "cpu", "xpu") else "cpu"
        with torch.autocast(device_type, enabled=False):
            return self._apply(images, params)

    def _apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        dtype = self.working_dtype(images.device)
        x = images.permute(0, 3, 1, 2)  # [N, 3, H, W] channels-last view, 0..255
        if self.downsample is not None:  # float32: antialiased resize has no half kernel on every device
            x = F.interpolate(x.float(), size=(self.downsample, self.downsample), mode="bilinear",
                              antialias=True, align_corners=False)
        if params.down is not None:
            x = down_up_where(x.float(), params.down, self.down_res)
        x = x.to(dtype)
        x = crop_flip_resize(x, params.crop, params.flip, self.size).mul_(1.0 / 255.0).clamp_(0.0, 1.0)
        if self.strong:
            x = color_jitter(x, params)
            x = grayscale_where(x, params.gray)
            x = gaussian_blur(x, params.blur_sigma)
        shift, inv_std = self._normalize_constants(x.device)
        return torch.addcmul(shift, x.to(self.out_dtype), inv_std)

    def _normalize_constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shift, inv_std)``, each ``out_dtype [1, 3, 1, 1]`` on ``device``; built once per device (a
        tensor built from a list on a CUDA device is a blocking copy, a host sync on every call)."""
        key = (device, self.out_dtype)
        if key not in self._normalize_cache:
            inv_std = torch.tensor([1.0 / s for s in self.std], device=device, dtype=self.out_dtype).view(1, 3, 1, 1)
            shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)], device=device,
                                 dtype=self.out_dtype).view(1, 3, 1, 1)
            self._normalize_cache[key] = (shift, inv_std)
        return self._normalize_cache[key]

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` on any device -> normalized float ``[N, 3, size, size]`` on that device."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"GPUAugment expects uint8 [N, H, W, 3], got {images.dtype} {tuple(images.shape)}")
        n, height, width, _ = images.shape
        if self.downsample is not None:
            height = width = self.downsample
        params = self.sample_params(n, height, width, images.device, generator)
        return self.apply(images, params)


def benchmark_augment(batch: int = 2048, size: int = 224, device: str | torch.device = "cuda",
                      iters: int = 20, input_size: int = 256, strong: bool = True, warmup: int = 3) -> float:
    """Images per second of :class:`GPUAugment` on random uint8 ``[batch, input_size, input_size, 3]``."""
    device = torch.device(device)
    images = torch.randint(0, 256, (batch, input_size, input_size, 3), dtype=torch.uint8, device=device)
    augment = GPUAugment(size=size, strong=strong)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        augment(images)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        augment(images)
    sync()
    return batch * iters / (time.perf_counter() - start)
