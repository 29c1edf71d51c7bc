"""Trainer throughput: the real training step fed by the online source vs the bare model step.

Measured in one run, with the same model, batch and precision:

- ``bare_step``: forward + multi-positive contrastive loss + backward + AdamW on synthetic float
  tensors already on the device (no data path, no augmentation): the ceiling. Eager, and
  ``torch.compile`` on CUDA.
- ``fed_step``: the training loop's step: the next batch from the source, drawn ahead in a thread
  as the loop does (``trainer.step_pipeline.Prefetcher``) -> device -> ``method(model, batch,
  augment)`` (GPU augmentation inside) -> backward -> AdamW; like the loop, no host sync per step. The source is a replay buffer
  pre-filled with caption groups (``source="replay"``: isolates the trainer side), or the online
  source connected to generator ``endpoints`` (``source="online"``: includes the live feed, its
  stall time shows up in the step).
- ``augment``: ``GPUAugment`` alone on uint8 ``[augment_batch, 256, 256, 3]`` -> 224.

``fed_over_bare`` = fed images/s / bare eager images/s: the share of the model's speed the data
path keeps.
"""
from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from typing import Any, Callable, Sequence

import numpy as np
import torch

from generator_service.backends.compile_support import compile_unavailable
from protocol import Group
from trainer.augment import GPUAugment, benchmark_augment
from trainer.kwargs_arg import add_kwargs_argument, merge_kwargs
from trainer.objectives.losses import MultiPosConLoss
from trainer.objectives.methods import build_method
from trainer.models.stablerep_model import build_model
from trainer.data.replay import ReplayBuffer
from trainer.step_pipeline import Prefetcher

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    dtype = _DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _time_steps(step: Callable[[], None], device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per step, averaged over ``steps`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _model_and_optimizer(model_name: str, img_size: int, model_kwargs: dict, head: tuple[int, int, int],
                         device: torch.device, compile_model: bool):
    model = build_model(model_name, img_size=img_size, model_kwargs=model_kwargs, head_hidden=head[0],
                        head_out=head[1], head_layers=head[2]).to(device)
    if compile_model:
        model.compile()
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, betas=(0.9, 0.98),
                                  fused=device.type == "cuda")
    return model, optimizer


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for ``fp16`` (as the trainer's Accelerate fp16 mode and the
    official recipe use); a disabled one (plain steps) for ``bf16`` / ``no``."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def _optimizer_step(loss: torch.Tensor, optimizer, scaler: torch.amp.GradScaler) -> None:
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _bare_step(model, optimizer, device: torch.device, precision: str, images: int, img_size: int,
               draw_per_caption: int, temperature: float) -> Callable[[], None]:
    x = torch.randn(images, 3, img_size, img_size, device=device)
    labels = torch.arange(images // draw_per_caption, device=device).repeat_interleave(draw_per_caption)
    loss_fn = MultiPosConLoss(temperature)
    scaler = grad_scaler(device, precision)

    def step() -> None:
        with _autocast(device, precision):
            loss = loss_fn(model(x), labels)
        _optimizer_step(loss, optimizer, scaler)

    return step


def _synthetic_group(caption_id: int, m: int, size: int, rng: np.random.Generator) -> Group:
    images = rng.integers(0, 256, (m, size, size, 3), dtype=np.uint8)
    return Group(group_id=f"bench-{caption_id}", caption_id=caption_id, caption=f"caption {caption_id}",
                 seeds=list(range(m)), images=images, generator="bench")


def _prefilled_replay(groups: int, m: int, size: int, device: torch.device) -> ReplayBuffer:
    storage = device if device.type == "cuda" else torch.device("cpu")
    replay = ReplayBuffer(groups, m, size, size, device=storage)
    rng = np.random.default_rng(0)
    for caption_id in range(groups):
        replay.add(_synthetic_group(caption_id, m, size, rng))
    return replay


class _ReplayFeed:
    """A pre-filled replay buffer as a source: ``next_batch`` samples it, ``state_dict`` is its own."""

    def __init__(self, replay: ReplayBuffer, captions: int, draw: int) -> None:
        self.replay, self.captions, self.draw = replay, captions, draw

    def next_batch(self):
        return self.replay.sample(self.captions, self.draw, timeout=60)

    def state_dict(self) -> dict:
        return self.replay.state_dict()

    def stats(self) -> dict:
        return self.replay.stats()

    def close(self) -> None:
        self.replay.close()


def run_trainer_bench(
    model: str = "vit_base_patch16_224",
    img_size: int = 224,
    model_kwargs: dict | None = None,
    head: tuple[int, int, int] = (4096, 256, 3),
    captions_per_step: int = 43,
    draw_per_caption: int = 6,
    stored_size: int = 256,
    precision: str = "bf16",
    steps: int = 10,
    warmup: int = 3,
    source: str = "replay",
    endpoints: Sequence[str] | None = None,
    strong_aug: bool = True,
    augment_batch: int = 2048,
    augment_iters: int = 10,
    compile_step: bool | None = None,
    device: str | torch.device | None = None,
    temperature: float = 0.1,
) -> dict[str, Any]:
    """Measure the step fed by a source vs the bare step; see the module docstring.

    Args:
        model, img_size, model_kwargs, head: the backbone (timm) and head (hidden, out, layers).
        captions_per_step, draw_per_caption: the batch (``G * n`` images; default 43 x 6 = 258,
            about the paper's per-GPU share on 32 GPUs).
        stored_size: side of the stored images the source serves (the paper stores 256).
        precision: ``bf16`` | ``fp16`` | ``no`` (autocast dtype).
        steps, warmup: timed and untimed steps per measurement.
        source: ``replay`` (pre-filled buffer) or ``online`` (needs ``endpoints``).
        augment_batch, augment_iters: the augmentation-only measurement (0 skips it).
        compile_step: also time the bare step under ``torch.compile`` (default: on CUDA only).
        device: default CUDA when available, else CPU.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
    if source not in ("replay", "online"):
        raise ValueError(f"source must be 'replay' or 'online', got {source!r}")
    if source == "online" and not endpoints:
        raise ValueError("source='online' needs generator endpoints")
    compile_skipped = None  # why the CUDA default of compiling could not be kept, if it could not
    if compile_step is None:  # default: on CUDA where inductor can work
        compile_skipped = compile_unavailable("cuda") if device.type == "cuda" else None
        compile_step = device.type == "cuda" and compile_skipped is None
    model_kwargs = dict(model_kwargs or {})
    images = captions_per_step * draw_per_caption
    torch.manual_seed(0)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": model, "img_size": img_size, "model_kwargs": model_kwargs, "head": list(head),
        "precision": precision, "captions_per_step": captions_per_step, "draw_per_caption": draw_per_caption,
        "images_per_step": images, "stored_size": stored_size, "steps": steps, "warmup": warmup,
    }

    # 1. bare step on device tensors, eager (and compiled)
    net, optimizer = _model_and_optimizer(model, img_size, model_kwargs, head, device, compile_model=False)
    bare = _time_steps(_bare_step(net, optimizer, device, precision, images, img_size, draw_per_caption,
                                  temperature), device, steps, warmup)
    results["bare_step"] = {"eager_step_ms": bare * 1e3, "eager_images_per_s": images / bare,
                            "compile_skipped": compile_skipped}

    # 2. the training step fed by a source, same model and batch
    method = build_method("stablerep", temperature=temperature)
    augment = GPUAugment(size=img_size, strong=strong_aug)
    if source == "replay":
        feed: Any = _ReplayFeed(_prefilled_replay(max(4 * captions_per_step, 64), draw_per_caption, stored_size,
                                                  device), captions_per_step, draw_per_caption)
    else:
        from trainer.data.config import DataConfig
        from trainer.data.sources.online import OnlineSource

        feed = OnlineSource(DataConfig(generators=list(endpoints), draw_per_caption=draw_per_caption,
                                       image_size=stored_size, connect_timeout=60, sample_timeout=600),
                            captions_per_rank=captions_per_step, device=device)
    prefetch = Prefetcher(feed, device, limit=warmup + steps)  # nothing drawn past the last timed step

    def close() -> None:
        prefetch.close()
        feed.close()

    scaler = grad_scaler(device, precision)

    def fed_step() -> None:
        batch = prefetch.next()
        with _autocast(device, precision):
            loss, _ = method(net, batch, augment)
        _optimizer_step(loss, optimizer, scaler)

    try:
        fed = _time_steps(fed_step, device, steps, warmup)
        source_stats = feed.stats()
    finally:
        close()
    results["fed_step"] = {
        "source": source, "step_ms": fed * 1e3, "images_per_s": images / fed,
        "source_stats": {k: v for k, v in source_stats.items() if isinstance(v, (int, float, str))},
    }
    results["fed_over_bare"] = bare / fed
    results["grad_scaler"] = scaler.is_enabled()
    del net, optimizer

    if compile_step:
        net, optimizer = _model_and_optimizer(model, img_size, model_kwargs, head, device, compile_model=True)
        compiled = _time_steps(_bare_step(net, optimizer, device, precision, images, img_size, draw_per_caption,
                                          temperature), device, steps, max(warmup, 3))
        results["bare_step"].update(compile_step_ms=compiled * 1e3, compile_images_per_s=images / compiled,
                                    compile_speedup=bare / compiled)
        del net, optimizer

    # 3. augmentation alone
    if augment_batch > 0:
        rate = benchmark_augment(batch=augment_batch, size=img_size, device=device, iters=augment_iters,
                                 input_size=stored_size, strong=strong_aug, warmup=1)
        results["augment"] = {"batch": augment_batch, "input_size": stored_size, "output_size": img_size,
                              "strong": strong_aug, "images_per_s": rate,
                              "share_of_bare_step": results["bare_step"]["eager_images_per_s"] / rate}
    return results


def format_table(results: dict[str, Any]) -> str:
    """A small text table of the measurements."""
    rows = [("bare step, eager", results["bare_step"]["eager_images_per_s"])]
    if "compile_images_per_s" in results["bare_step"]:
        rows.append(("bare step, torch.compile", results["bare_step"]["compile_images_per_s"]))
    rows.append((f"fed step ({results['fed_step']['source']} source)", results["fed_step"]["images_per_s"]))
    if "augment" in results:
        rows.append((f"GPUAugment alone (batch {results['augment']['batch']})", results["augment"]["images_per_s"]))
    head = (f"trainer: {results['model']} @ {results['img_size']}, {results['images_per_step']} images/step, "
            f"{results['precision']}, {results['device']}")
    width = max(len(name) for name, _ in rows)
    lines = [head, f"{'stage'.ljust(width)}  images/s"]
    lines += [f"{name.ljust(width)}  {value:10.1f}" for name, value in rows]
    lines.append(f"{'fed / bare'.ljust(width)}  {results['fed_over_bare']:10.3f}")
    skipped = results["bare_step"].get("compile_skipped")
    if skipped:
        lines.append(f"torch.compile skipped: {skipped}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``stablerep-bench trainer`` flags."""
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm backbone (default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=224, help="crop side (default: %(default)s)")
    add_kwargs_argument(parser, "--model-kwargs", default=None, help="timm.create_model arguments, e.g. depth=2")
    parser.add_argument("--captions-per-step", type=int, default=43, help="caption groups per step (default: %(default)s)")
    parser.add_argument("--draw-per-caption", type=int, default=6, help="images drawn per group (default: %(default)s)")
    parser.add_argument("--precision", default="bf16", choices=sorted(_DTYPES), help="autocast dtype (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default: %(default)s)")
    parser.add_argument("--source", default="replay", choices=["replay", "online"], help="replay: a filled replay buffer in this process; online: live generators (default: %(default)s)")
    parser.add_argument("--generators", nargs="*", default=None, help="online: generator endpoints tcp://HOST:PORT")
    parser.add_argument("--augment-batch", type=int, default=2048, help="images per timed augmentation batch (default: %(default)s)")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when present)")
    parser.add_argument("--quick", action="store_true", help="a tiny ViT at 32 px on the replay source (tests)")


def run_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], str, dict[str, float]]:
    """Run with parsed flags; return (results, table, bars in images/s)."""
    extra: dict[str, Any] = {}
    model_kwargs = merge_kwargs(args.model_kwargs)
    if args.quick:
        args.model, args.img_size, model_kwargs = "vit_tiny_patch16_224", 32, {"patch_size": 8, "depth": 1}
        args.captions_per_step, args.draw_per_caption, args.precision, args.steps = 4, 3, "no", 2
        args.augment_batch, args.source = 16, "replay"
        extra = {"head": (32, 16, 2), "stored_size": 40, "warmup": 1, "augment_iters": 1}
    results = run_trainer_bench(**extra, model=args.model, img_size=args.img_size, model_kwargs=model_kwargs,
                                captions_per_step=args.captions_per_step, draw_per_caption=args.draw_per_caption,
                                precision=args.precision, steps=args.steps, source=args.source,
                                endpoints=args.generators, augment_batch=args.augment_batch, device=args.device)
    bars = {"bare eager": results["bare_step"]["eager_images_per_s"], "fed": results["fed_step"]["images_per_s"]}
    if "compile_images_per_s" in results["bare_step"]:
        bars["bare compile"] = results["bare_step"]["compile_images_per_s"]
    return results, format_table(results), bars
