"""FLOPs per generated and per trained image, counted on the real architectures (machine independent).

Every network is built on the ``meta`` device (shapes only, no weights, no arithmetic) and run once
under ``torch.utils.flop_counter.FlopCounterMode``, so the counts are exact for the shapes and take
seconds on a laptop whatever the resolution.

Per generated image (one caption group of ``images_per_group`` images, one diffusers pipeline call):

- ``unet``: UNet forward at latent ``[1, 4, H/8, W/8]`` x the number of UNet calls the scheduler makes
  for ``steps`` (``len(scheduler.timesteps)``; Heun makes about two per step) x 2 with
  classifier-free guidance (``guidance > 1``: the pipeline batches the unconditional branch);
- ``text_encoder``: one CLIP text encoder pass per caption (two with guidance: the empty negative
  prompt), shared by the ``images_per_group`` images of the group;
- ``vae_decode``: VAE decoder from the latent to ``[1, 3, H, W]``.

``unet`` is split into ``unet_dense`` (convolutions and linear layers) and ``unet_attention`` (the
``QK^T`` and ``PV`` products of attention); the anchor counts of DESIGN.md are the dense part.

Per trained image: the training model (timm backbone + projection head) forward and backward,
``[N, 3, S, S]`` float; the loss's similarity matrix is not counted (it is ``O(N^2 d)`` per batch,
under 1% at the paper's batch).
"""
from __future__ import annotations

import argparse
from typing import Any

from benchmarks.flop_counter import count_flops

DEFAULT_PEAK_TFLOPS = 798.0  # bf16 dense matmul peak measured on one H100 (DESIGN.md)
_ATTENTION_OPS = ("bmm", "baddbmm", "_scaled_dot_product")


def _sd_configs(model: str) -> tuple[dict, dict, dict, dict]:
    """(unet, vae, text encoder, scheduler) configs of ``random:sd15`` or a local diffusers folder."""
    if model == "random:sd15":
        from generator_service.backends.random_sd15 import (
            SD15_SCHEDULER_CONFIG,
            SD15_TEXT_CONFIG,
            SD15_UNET_CONFIG,
            SD15_VAE_CONFIG,
        )

        return dict(SD15_UNET_CONFIG), dict(SD15_VAE_CONFIG), dict(SD15_TEXT_CONFIG), dict(SD15_SCHEDULER_CONFIG)
    import json
    from pathlib import Path

    root = Path(model)
    configs = []
    for sub, name in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                      ("scheduler", "scheduler_config.json")):
        path = root / sub / name
        if not path.is_file():
            raise ValueError(f"--model {model!r}: no {path} (give random:sd15 or a local diffusers pipeline folder)")
        configs.append(json.loads(path.read_text()))
    return tuple(configs)  # type: ignore[return-value]


def unet_calls(scheduler: str, steps: int, scheduler_config: dict) -> int:
    """UNet evaluations per image for ``steps`` (what the pipeline loop runs: ``len(scheduler.timesteps)``)."""
    import diffusers

    from generator_service.schedulers import SCHEDULERS

    if scheduler in (None, "default"):
        class_name, overrides = scheduler_config.get("_class_name", "PNDMScheduler"), {}
    elif scheduler in SCHEDULERS:
        class_name, overrides = SCHEDULERS[scheduler]
    else:
        raise ValueError(f"--scheduler {scheduler!r}: not one of default, {', '.join(SCHEDULERS)}")
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    sched = getattr(diffusers, class_name).from_config(config, **overrides)
    sched.set_timesteps(steps)
    return len(sched.timesteps)


def generator_flops(model: str = "random:sd15", scheduler: str = "ddim", steps: int = 50, guidance: float = 2.0,
                    height: int = 512, width: int = 512, images_per_group: int = 10) -> dict[str, Any]:
    """FLOPs per generated image of one recipe, by component (see module docstring)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if height % 8 or width % 8 or height <= 0 or width <= 0:
        raise ValueError(f"--height/--width must be positive multiples of 8, got {height}x{width}")
    if steps <= 0 or images_per_group <= 0:
        raise ValueError(f"--steps and --images-per-group must be positive, got {steps}, {images_per_group}")
    unet_cfg, vae_cfg, text_cfg, sched_cfg = _sd_configs(model)
    cfg_factor = 2 if guidance > 1.0 else 1
    calls = unet_calls(scheduler, steps, sched_cfg)
    text_keys = {k: v for k, v in text_cfg.items() if not k.startswith("_") and k not in ("architectures",)}
    with torch.device("meta"), torch.no_grad():
        unet = UNet2DConditionModel.from_config({k: v for k, v in unet_cfg.items() if not k.startswith("_")})
        vae = AutoencoderKL.from_config({k: v for k, v in vae_cfg.items() if not k.startswith("_")})
        text = CLIPTextModel(CLIPTextConfig(**text_keys))
        length = text.config.max_position_embeddings
        latent = torch.empty(1, unet.config.in_channels, height // 8, width // 8)
        context = torch.empty(1, length, unet.config.cross_attention_dim)
        unet_total, unet_ops = count_flops(lambda: unet(latent, torch.tensor([10]), encoder_hidden_states=context))
        vae_total, _ = count_flops(lambda: vae.decode(torch.empty(1, vae.config.latent_channels, height // 8, width // 8)))
        text_total, _ = count_flops(lambda: text(torch.zeros(1, length, dtype=torch.long)))
    attention = sum(n for op, n in unet_ops.items() if op.startswith(_ATTENTION_OPS))
    per_call = {"unet_dense": unet_total - attention, "unet_attention": attention}
    breakdown = {
        "unet": unet_total * calls * cfg_factor,
        "unet_dense": per_call["unet_dense"] * calls * cfg_factor,
        "unet_attention": per_call["unet_attention"] * calls * cfg_factor,
        "text_encoder": text_total * cfg_factor / images_per_group,
        "vae_decode": vae_total,
    }
    total = breakdown["unet"] + breakdown["text_encoder"] + breakdown["vae_decode"]
    return {
        "recipe": {"model": model, "scheduler": scheduler, "steps": steps, "guidance": guidance, "height": height,
                   "width": width, "images_per_group": images_per_group},
        "unet_calls": calls,
        "cfg_factor": cfg_factor,
        "per_forward_tflop": {"unet": unet_total / 1e12, **{k: v / 1e12 for k, v in per_call.items()},
                              "text_encoder": text_total / 1e12, "vae_decode": vae_total / 1e12},
        "tflop_per_image": total / 1e12,
        "breakdown_tflop": {k: v / 1e12 for k, v in breakdown.items()},
    }


def trainer_flops(model: str = "vit_base_patch16_224", img_size: int = 224, head_hidden: int = 4096,
                  head_out: int = 256, head_layers: int = 3) -> dict[str, Any]:
    """FLOPs per trained image: the StableRep model's forward and forward+backward on ``[2, 3, S, S]``."""
    import torch

    from trainer.models.stablerep_model import build_model

    batch = 2
    with torch.device("meta"):
        net = build_model(model, img_size=img_size, head_hidden=head_hidden, head_out=head_out,
                          head_layers=head_layers)
        images = torch.empty(batch, 3, img_size, img_size)
        forward, _ = count_flops(lambda: net(images))
        step, _ = count_flops(lambda: net(images).float().square().sum().backward())
    return {
        "model": model, "img_size": img_size,
        "forward_tflop_per_image": forward / batch / 1e12,
        "tflop_per_image": step / batch / 1e12,
        "backward_over_forward": (step - forward) / forward,
    }


def run_flops(model: str = "random:sd15", scheduler: str = "ddim", steps: int = 50, guidance: float = 2.0,
              height: int = 512, width: int = 512, images_per_group: int = 10,
              trainer_model: str = "vit_base_patch16_224", img_size: int = 224,
              peak_tflops: float = DEFAULT_PEAK_TFLOPS) -> dict[str, Any]:
    """Both counts and the physical limits in images/s at ``peak_tflops`` (every FLOP at the peak)."""
    if peak_tflops <= 0:
        raise ValueError(f"--peak-tflops must be positive, got {peak_tflops}")
    gen = generator_flops(model, scheduler, steps, guidance, height, width, images_per_group)
    train = trainer_flops(trainer_model, img_size)
    return {
        "generator": gen,
        "trainer": train,
        "tflop_per_image": gen["tflop_per_image"],
        "peak_tflops": peak_tflops,
        "generator_images_per_s_limit": peak_tflops / gen["tflop_per_image"],
        "trainer_images_per_s_limit": peak_tflops / train["tflop_per_image"],
        "generation_over_training": gen["tflop_per_image"] / train["tflop_per_image"],
    }


def format_table(result: dict[str, Any]) -> str:
    g, t = result["generator"], result["trainer"]
    r = g["recipe"]
    lines = [
        (f"recipe: {r['model']} {r['scheduler']} {r['steps']} steps ({g['unet_calls']} UNet calls), guidance "
        f"{r['guidance']} (x{g['cfg_factor']}), {r['height']}x{r['width']}, {r['images_per_group']} images/group"),
        f"{'component':<16} {'TFLOP/forward':>14} {'TFLOP/image':>12}",
    ]
    for name in ("unet", "unet_dense", "unet_attention", "text_encoder", "vae_decode"):
        lines.append(f"{name:<16} {g['per_forward_tflop'][name]:>14.4f} {g['breakdown_tflop'][name]:>12.3f}")
    lines += [
        f"{'generated image':<16} {'':>14} {g['tflop_per_image']:>12.3f}",
        (f"{'trained image':<16} {t['forward_tflop_per_image']:>14.4f} {t['tflop_per_image']:>12.4f}"
        f"  ({t['model']} @ {t['img_size']}, forward+backward)"),
        (f"limit at {result['peak_tflops']:g} TFLOP/s: {result['generator_images_per_s_limit']:.1f} generated images/s, "
        f"{result['trainer_images_per_s_limit']:.0f} trained images/s "
        f"(one generated image = {result['generation_over_training']:.0f} trained images)"),
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``stablerep-bench flops`` flags (the recipe flags are those of ``generator``)."""
    parser.add_argument("--model", default="random:sd15", help="random:sd15 or a local diffusers pipeline folder")
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--images-per-group", type=int, default=10)
    parser.add_argument("--trainer-model", default="vit_base_patch16_224", help="timm name of the trained backbone")
    parser.add_argument("--img-size", type=int, default=224, help="training resolution")
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                        help="device peak for the physical limit (default: %(default)s, bf16 on one H100)")
    parser.add_argument("--quick", action="store_true", help="small sizes (128 px generated, 64 px trained)")
    parser.add_argument("--recipe", help="FLOPs per image of a generator recipe (paper | dpm20 | lcm4 | turbo | "
                                         "turbo-tiny) on its own architecture, vs the paper recipe; 'all' for every one")


def run_from_args(args: Any) -> tuple[dict[str, Any], str, dict[str, float]]:
    if args.recipe is not None:
        return _recipe_from_args(args)
    if args.quick:
        args.height, args.width, args.steps, args.img_size = 128, 128, 4, 64
    result = run_flops(args.model, args.scheduler, args.steps, args.guidance, args.height, args.width,
                       args.images_per_group, args.trainer_model, args.img_size, args.peak_tflops)
    bars = {k: v for k, v in result["generator"]["breakdown_tflop"].items() if k != "unet"}
    bars["trained image"] = result["trainer"]["tflop_per_image"]
    return result, format_table(result), bars


def _recipe_from_args(args: Any) -> tuple[dict[str, Any], str, dict[str, float]]:
    """``--recipe NAME|all``: the recipes' FLOPs per image (`benchmarks.recipe_flops`), vs the paper's."""
    from generator_service.recipes import RECIPE_NAMES

    from .recipe_flops import format_table as recipe_rows_table
    from .recipe_flops import recipe_table

    if args.recipe != "all" and args.recipe not in RECIPE_NAMES:
        raise ValueError(f"--recipe {args.recipe!r}: unknown; known: {', '.join(RECIPE_NAMES)}, all")
    if args.images_per_group < 1:
        raise ValueError(f"--images-per-group must be >= 1, got {args.images_per_group}")
    names = None if args.recipe == "all" else [args.recipe]
    rows = recipe_table(args.images_per_group, names)
    results = {"images_per_group": args.images_per_group, "recipes": rows}
    return results, recipe_rows_table(rows), {row["recipe"]: row["tflop_per_image"] for row in rows}
