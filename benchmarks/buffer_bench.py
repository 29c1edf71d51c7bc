"""The data path's cost per batch: replay sampling and GPU augmentation, against the train step.

Measured in one run, on one device, for one batch of ``G = captions_per_step`` groups x
``n = draw_per_caption`` images:

- ``sample``: ``ReplayBuffer.sample(G, n)`` from a pre-filled buffer (uint8 ``[G, n, S, S, 3]`` on
  the storage device: GPU memory on CUDA, host memory otherwise), plus the copy to the device;
- ``augment``: ``GPUAugment`` (strong: crop, flip, colour jitter, grayscale, blur) on those
  ``G n`` images -> float ``[G n, 3, s, s]``;
- ``step``: the bare training step (forward + loss + backward + AdamW) on ``G n`` device tensors.

``*_share`` = stage time / step time: what the data path adds to each step when not overlapped.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks.trainer_bench import (
    _bare_step,
    _model_and_optimizer,
    _prefilled_replay,
    _sync,
    _time_steps,
)
from trainer.augment import GPUAugment
from trainer.augment_config import AugmentConfig
from trainer.kwargs_arg import add_kwargs_argument, merge_kwargs


def run_buffer_bench(model: str = "vit_base_patch16_224", img_size: int = 224, model_kwargs: dict | None = None,
                     head: tuple[int, int, int] = (4096, 256, 3), captions_per_step: int = 43,
                     draw_per_caption: int = 6, images_per_group: int = 10, stored_size: int = 256,
                     buffer_groups: int | None = None, steps: int = 10, warmup: int = 2, precision: str = "bf16",
                     device: str | None = None) -> dict[str, Any]:
    """Times per batch of sampling, augmentation and the bare step (see the module docstring)."""
    if draw_per_caption > images_per_group:
        raise ValueError(f"--draw-per-caption {draw_per_caption} exceeds --images-per-group {images_per_group}")
    device_t = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    images = captions_per_step * draw_per_caption
    groups = buffer_groups or max(4 * captions_per_step, 64)
    replay = _prefilled_replay(groups, images_per_group, stored_size, device_t)
    augment = GPUAugment.from_config(AugmentConfig(strong=True), img_size=img_size)
    if isinstance(augment, torch.nn.Module):
        augment = augment.to(device_t)
    try:
        last: dict[str, Any] = {}

        def sample() -> None:
            batch = replay.sample(captions_per_step, draw_per_caption, timeout=60)
            last["images"] = batch.images.to(device_t, non_blocking=True).flatten(0, 1)

        sample_s = _time_steps(sample, device_t, steps, warmup)
        flat = last["images"]
        augment_s = _time_steps(lambda: augment(flat), device_t, steps, warmup)
        stats = replay.stats()
    finally:
        replay.close()
    net, optimizer = _model_and_optimizer(model, img_size, dict(model_kwargs or {}), head, device_t,
                                          compile_model=False)
    step_s = _time_steps(_bare_step(net, optimizer, device_t, precision, images, img_size, draw_per_caption, 0.1),
                         device_t, steps, warmup)
    _sync(device_t)
    return {
        "device": torch.cuda.get_device_name(device_t) if device_t.type == "cuda" else "cpu",
        "storage": str(replay.device), "model": model, "img_size": img_size, "precision": precision,
        "captions_per_step": captions_per_step, "draw_per_caption": draw_per_caption, "images_per_batch": images,
        "stored_size": stored_size, "buffer_groups": groups, "steps": steps,
        "sample_ms": sample_s * 1e3, "augment_ms": augment_s * 1e3, "step_ms": step_s * 1e3,
        "sample_images_per_s": images / sample_s, "augment_images_per_s": images / augment_s,
        "step_images_per_s": images / step_s,
        "sample_share": sample_s / step_s, "augment_share": augment_s / step_s,
        "data_path_share": (sample_s + augment_s) / step_s,
        "draws": stats["draws"],
    }


def format_table(r: dict[str, Any]) -> str:
    lines = [(f"buffer: {r['captions_per_step']} x {r['draw_per_caption']} = {r['images_per_batch']} images/batch, "
             f"stored {r['stored_size']} -> {r['img_size']}, storage {r['storage']}, {r['device']}"),
             f"{'stage':<22}{'ms/batch':>10}{'images/s':>12}{'x step':>8}"]
    for name, key in (("replay sample + copy", "sample"), ("GPUAugment (strong)", "augment"), ("bare train step", "step")):
        share = r[f"{key}_share"] if key != "step" else 1.0
        lines.append(f"{name:<22}{r[f'{key}_ms']:>10.2f}{r[f'{key}_images_per_s']:>12.0f}{share:>8.3f}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    add_kwargs_argument(parser, "--model-kwargs", default=None, help="timm.create_model arguments, e.g. depth=2")
    parser.add_argument("--captions-per-step", type=int, default=43)
    parser.add_argument("--draw-per-caption", type=int, default=6)
    parser.add_argument("--images-per-group", type=int, default=10)
    parser.add_argument("--stored-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    parser.add_argument("--device")
    parser.add_argument("--quick", action="store_true", help="a tiny ViT at 32 px, 8 x 2 images (tests)")


def run_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], str, dict[str, float]]:
    head = (4096, 256, 3)
    if args.quick:
        args.model, args.img_size, args.model_kwargs = "vit_tiny_patch16_224", 32, [{"patch_size": 8, "depth": 1}]
        args.captions_per_step, args.draw_per_caption, args.images_per_group = 8, 2, 4
        args.stored_size, args.steps, args.precision, head = 40, 2, "no", (32, 16, 2)
    result = run_buffer_bench(args.model, args.img_size, merge_kwargs(args.model_kwargs), head, args.captions_per_step,
                              args.draw_per_caption, args.images_per_group, args.stored_size, None, args.steps,
                              2, args.precision, args.device)
    bars = {"sample": result["sample_images_per_s"], "augment": result["augment_images_per_s"],
            "step": result["step_images_per_s"]}
    return result, format_table(result), bars
