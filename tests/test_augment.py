"""GPUAugment: shapes, determinism, per-sample parameters, and each op against torchvision."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from trainer.augment import (
    IMAGENET_MEAN, IMAGENET_STD, AugmentParams, GPUAugment, adjust_brightness, adjust_contrast,
    adjust_hue, adjust_saturation, benchmark_augment, color_jitter, crop_flip_resize, gaussian_blur,
    grayscale_where, sample_crops,
)


def images(n=6, h=40, w=40, seed=0):
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def identity_params(n, h, w, flip=False):
    ones, zeros = torch.ones(n), torch.zeros(n)
    return AugmentParams(crop=torch.tensor([[0.0, 0.0, h, w]] * n), flip=torch.full((n,), flip),
                         brightness=ones, contrast=ones, saturation=ones, hue=zeros,
                         gray=torch.zeros(n, dtype=torch.bool), blur_sigma=zeros)


def unnormalize(x):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x * std + mean


@pytest.mark.parametrize("strong", [True, False])
def test_output_shape_dtype_range(strong):
    out = GPUAugment(size=24, strong=strong)(images(), generator=torch.Generator().manual_seed(1))
    assert out.shape == (6, 3, 24, 24) and out.dtype == torch.float32
    pixels = unnormalize(out)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert torch.isfinite(out).all()


def test_deterministic_given_generator_and_params_differ_per_sample():
    aug = GPUAugment(size=24)
    x = images()
    a = aug(x, generator=torch.Generator().manual_seed(5))
    b = aug(x, generator=torch.Generator().manual_seed(5))
    c = aug(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    params = aug.sample_params(64, 40, 40, generator=torch.Generator().manual_seed(7))
    assert params.crop.unique(dim=0).shape[0] > 32
    assert 0 < params.flip.sum() < 64 and 0 < params.gray.sum() < 64
    assert params.brightness.unique().numel() > 32 and params.hue.unique().numel() > 32
    assert (params.blur_sigma == 0).any() and (params.blur_sigma > 0).any()
    # the same image repeated gets different views
    same = aug(x[:1].expand(4, -1, -1, -1).contiguous(), generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(same[0], same[1])


def test_sampled_crops_follow_scale_and_ratio():
    crops = sample_crops(2000, 64, 48, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0),
                         torch.device("cpu"))
    top, left, h, w = crops.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 48).all()
    area = h * w / (64 * 48)
    assert area.min() >= 0.06 and area.max() <= 1.0
    ratio = w / h
    assert ratio.min() > 0.7 and ratio.max() < 1.4
    # impossible scale -> the center crop fallback
    fallback = sample_crops(4, 20, 80, (1.0, 1.0), (1.0, 1.0), None, torch.device("cpu"))
    assert fallback[0].tolist() == [0.0, 30.0, 20.0, 20.0]


def test_identity_crop_and_flip():
    x = images(4, 16, 16)
    aug = GPUAugment(size=16, strong=False)
    plain = aug.apply(x, identity_params(4, 16, 16, flip=False))
    flipped = aug.apply(x, identity_params(4, 16, 16, flip=True))
    expected = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flipped, torch.flip(expected, dims=[3]), rtol=1e-5, atol=1e-5)


def test_crop_matches_torchvision_resized_crop():
    x = torch.rand(2, 3, 40, 40)
    crop = torch.tensor([[4.0, 6.0, 20.0, 20.0], [0.0, 10.0, 30.0, 24.0]])
    out = crop_flip_resize(x, crop, torch.tensor([False, True]), 10)
    ref0 = TF.resized_crop(x[0], 4, 6, 20, 20, [10, 10], antialias=False)
    torch.testing.assert_close(out[0], ref0, rtol=1e-5, atol=1e-5)
    ref1 = TF.horizontal_flip(TF.resized_crop(x[1], 0, 10, 30, 24, [10, 10], antialias=False))
    torch.testing.assert_close(out[1], ref1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ours, theirs, factors", [
    (adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.25, 1.4]),
    (adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.25, 1.4]),
    (adjust_saturation, TF.adjust_saturation, [0.6, 1.0, 1.25, 1.4]),
    (adjust_hue, TF.adjust_hue, [-0.1, 0.0, 0.04, 0.1]),
])
def test_colour_ops_match_torchvision(ours, theirs, factors):
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    x[0, :, :2] = 0.5  # grey pixels (zero chroma) too
    mine = ours(x.clone(), torch.tensor(factors))
    ref = torch.stack([theirs(x[i], f) for i, f in enumerate(factors)])
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


def test_hue_half_precision_close_to_float():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    shift = torch.tensor([0.1, -0.07])
    torch.testing.assert_close(adjust_hue(x.half(), shift).float(), adjust_hue(x, shift), rtol=0, atol=1e-2)


def test_half_working_dtype_close_to_float32():
    """The CUDA default (float16 working dtype) run on CPU against float32, with autocast around it."""
    x = images(8, 48, 48, seed=3)
    params = GPUAugment(size=24).sample_params(8, 48, 48, generator=torch.Generator().manual_seed(2))
    ref = GPUAugment(size=24).apply(x, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = GPUAugment(size=24, dtype=torch.float16).apply(x, params)
    assert half.dtype == torch.float32
    assert (half - ref).abs().mean() < 0.01 and (half - ref).abs().max() < 0.2


def test_blur_respects_sigma():
    x = torch.rand(4, 3, 20, 20, generator=torch.Generator().manual_seed(9))
    sigma = torch.tensor([0.0, 0.3, 1.0, 2.0])
    out = gaussian_blur(x, sigma)
    torch.testing.assert_close(out[0], x[0])
    for i in range(1, 4):
        ref = TF.gaussian_blur(x[i], [13, 13], [float(sigma[i])] * 2)
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)
    roughness = [(out[i].diff(dim=-1).abs().mean()).item() for i in range(4)]
    assert roughness == sorted(roughness, reverse=True)


def test_grayscale_channels_equal_only_where_asked():
    x = torch.rand(3, 3, 6, 6)
    out = grayscale_where(x, torch.tensor([True, False, True]))
    for i in (0, 2):
        assert torch.equal(out[i, 0], out[i, 1]) and torch.equal(out[i, 1], out[i, 2])
        torch.testing.assert_close(out[i, 0], TF.rgb_to_grayscale(x[i])[0])
    assert torch.equal(out[1], x[1])


def test_full_strong_pipeline_matches_composed_reference():
    x = images(2, 24, 24, seed=2)
    aug = GPUAugment(size=12)
    params = AugmentParams(crop=torch.tensor([[2.0, 3.0, 18.0, 20.0], [0.0, 0.0, 24.0, 24.0]]),
                           flip=torch.tensor([True, False]), brightness=torch.tensor([1.2, 0.7]),
                           contrast=torch.tensor([0.8, 1.3]), saturation=torch.tensor([1.4, 0.6]),
                           hue=torch.tensor([0.05, -0.1]), gray=torch.tensor([False, True]),
                           blur_sigma=torch.tensor([0.0, 1.5]))
    out = unnormalize(aug.apply(x, params))
    img = x.permute(0, 3, 1, 2).float() / 255
    ref0 = TF.horizontal_flip(TF.resized_crop(img[0], 2, 3, 18, 20, [12, 12], antialias=False))
    ref1 = TF.resize(img[1], [12, 12], antialias=False)
    refs = []
    for r, i in ((ref0, 0), (ref1, 1)):
        r = TF.adjust_brightness(r, float(params.brightness[i]))
        r = TF.adjust_contrast(r, float(params.contrast[i]))
        r = TF.adjust_saturation(r, float(params.saturation[i]))
        r = TF.adjust_hue(r, float(params.hue[i]))
        refs.append(r)
    refs[1] = TF.gaussian_blur(TF.rgb_to_grayscale(refs[1], 3), [13, 13], [1.5, 1.5])
    # crop borders: grid_sample reads the neighbours outside the crop, resized_crop clamps to it
    torch.testing.assert_close(out[0, :, 1:-1, 1:-1], refs[0][:, 1:-1, 1:-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], refs[1], rtol=1e-4, atol=1e-4)


def test_downsample_then_augment():
    x = images(3, 64, 64)
    aug = GPUAugment(size=16, strong=False, downsample=8)
    params = identity_params(3, 8, 8)
    low = TF.resize(x.permute(0, 3, 1, 2).float(), [8, 8], antialias=True)
    expected = TF.normalize(TF.resize(low, [16, 16], antialias=False) / 255, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(aug.apply(x, params), expected, rtol=1e-4, atol=1e-4)
    assert aug(x).shape == (3, 3, 16, 16)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        GPUAugment(size=8)(torch.rand(2, 8, 8, 3))
    with pytest.raises(ValueError, match="scale"):
        GPUAugment(scale=(0.5, 0.1))


def test_benchmark_reports_rate_on_cpu():
    assert benchmark_augment(batch=4, size=16, device="cpu", iters=1, input_size=20, warmup=1) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_half_matches_cpu_float():
    x = images(8, 64, 64)
    aug = GPUAugment(size=32)
    params = aug.sample_params(8, 64, 64, generator=torch.Generator().manual_seed(0))
    cpu = aug.apply(x, params)
    gpu = aug.apply(x.cuda(), params.to("cuda")).cpu()
    assert gpu.dtype == cpu.dtype and gpu.shape == cpu.shape
    # float16 working dtype, sampling grid included: on random-noise pixels a grid step of ~1/60 px
    # moves single outputs by up to ~0.1 (normalized); the same bounds as the float16 test on CPU.
    assert (gpu - cpu).abs().mean() < 0.01 and (gpu - cpu).abs().max() < 0.2


# ----- colour jitter: each op once per batch off the host ---------------------------------------------
class _BytesWritten:
    """Counts the bytes of every tensor that aten ops return (on the meta device: shapes only)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                counter.bytes += sum(t.numel() * t.element_size() for t in tree_flatten(out)[0]
                                     if isinstance(t, torch.Tensor))
                return out

        self.bytes, self.mode = 0, Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_balanced_orders_are_uniform_per_sample_and_exact_quarters_per_position():
    from trainer.augment import JITTER_ORDERS, balanced_orders

    orders = balanced_orders(24 * 500 + 7, torch.Generator().manual_seed(0), torch.device("cpu"))
    head = orders[:24 * 500]
    for k in range(4):
        assert torch.bincount(head[:, k], minlength=4).tolist() == [3000] * 4
    codes = (orders[:, None, :] == JITTER_ORDERS[None]).all(-1).float().argmax(-1)
    assert torch.bincount(codes, minlength=24).min() >= 500  # every order, equally often per block
    assert len({tuple(o) for o in orders[24 * 500:].tolist()}) == 7  # the tail: distinct orders of one block


def test_sorted_jitter_equals_the_per_sample_reference():
    aug = GPUAugment(size=16, balanced_jitter=True)
    params = aug.sample_params(53, 20, 20, generator=torch.Generator().manual_seed(3))  # 48 balanced + 5
    assert params.jitter_balanced == 48
    x = torch.rand(53, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    reference = color_jitter(x, params, sorted_ops=False)  # on the host: each op on its own rows
    assert torch.equal(color_jitter(x, params, sorted_ops=True), reference)


def test_jitter_off_the_host_moves_each_op_once_not_four_times():
    """On the meta device (as on a GPU: no host reads), the balanced batch costs one pass of each op
    plus a few gathers; the masked way runs every op at every position on the whole batch."""
    n, side = 96, 64
    aug = GPUAugment(size=side, balanced_jitter=True)
    params = aug.sample_params(n, side, side, device="meta")
    x = torch.empty(n, 3, side, side, device="meta")
    batch_bytes = x.numel() * 4
    with _BytesWritten() as once:  # each op once on the whole batch, fixed order: the floor
        color_jitter(x, dataclasses.replace(params, jitter_order=None))
    with _BytesWritten() as sorted_way:
        color_jitter(x, params)  # the default off the host
    with _BytesWritten() as masked_way:
        color_jitter(x, params, sorted_ops=False)
    assert sorted_way.bytes <= once.bytes + 16 * batch_bytes  # plus 5 gathers and 4 concatenations (measured: 14)
    assert masked_way.bytes > 3 * once.bytes


def test_from_config_builds_what_the_augment_group_describes():
    from trainer.augment_config import AugmentConfig

    weak = GPUAugment.from_config(AugmentConfig(strong=False, crops_per_image=2, down_res=[64, 128]), img_size=24)
    assert (weak.size, weak.strong, weak.scale, weak.flip_p) == (24, False, (0.5, 1.0), 0.0)  # the official weak recipe
    assert (weak.crops_per_image, weak.down_res, weak.down_prob) == (2, (64, 128), 0.05)
    strong = GPUAugment.from_config(AugmentConfig(size=16, scale_min=0.2, blur_p=0.25, downsample=32), img_size=24,
                                    dtype=torch.float32)
    assert (strong.size, strong.scale, strong.flip_p, strong.blur_p, strong.downsample) == (16, (0.2, 1.0), 0.5, 0.25, 32)
    assert strong.dtype == torch.float32
