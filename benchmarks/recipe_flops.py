"""FLOPs per image of each generator recipe, counted on the real architectures (meta device, no weights).

    stablerep-bench flops --recipe all [--images-per-group 10]     # or --recipe NAME

``torch.utils.flop_counter.FlopCounterMode`` counts 2 x multiply-adds of every matmul,
convolution and attention (scaled_dot_product_attention) call in one forward pass of each part,
on tensors of the meta device (shapes only: nothing is computed, so the real sizes take seconds).
Per image:

    text encoder / images_per_group  (one pass per distinct caption; the empty caption's pass is once per batch)
    + steps x (2 with classifier-free guidance, else 1) x UNet pass of one sample
    + one decoder pass (AutoencoderKL, or AutoencoderTiny for tiny:*)

Fused LoRA adapters add nothing. Architectures: SD v1.5 (`random_sd15`); the turbo recipes' model,
SD-Turbo, is SD 2.1's (UNet with linear projections, 5-20 heads, 1024-d cross attention;
OpenCLIP ViT-H/14 text tower, 23 layers).
"""
from __future__ import annotations

from typing import Any

from benchmarks.flop_counter import count_flops
from generator_service.backends.random_sd15 import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG
from generator_service.config import GeneratorConfig
from generator_service.recipes import RECIPE_NAMES, SD_TURBO

SD21_UNET_CONFIG = {**SD15_UNET_CONFIG, "attention_head_dim": (5, 10, 20, 20), "cross_attention_dim": 1024,
                    "use_linear_projection": True}
SD21_TEXT_CONFIG = {**SD15_TEXT_CONFIG, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                    "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 1024}
ARCHITECTURES = {"sd15": (SD15_UNET_CONFIG, SD15_TEXT_CONFIG), "sd21": (SD21_UNET_CONFIG, SD21_TEXT_CONFIG)}


def _count(fn) -> int:
    """Total FLOPs of ``fn()``, counted as ``stablerep-bench flops`` counts them."""
    return count_flops(fn)[0]


def part_flops(architecture: str, height: int, width: int, tiny_decoder: bool) -> dict[str, int]:
    """FLOPs of one pass of each part: text encoder (one caption), UNet (one sample), decoder (one image)."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_config, text_config = ARCHITECTURES[architecture]
    with torch.device("meta"), torch.inference_mode():
        unet = UNet2DConditionModel(**unet_config)
        text = CLIPTextModel(CLIPTextConfig(**text_config))
        decoder = AutoencoderTiny() if tiny_decoder else AutoencoderKL(**SD15_VAE_CONFIG)
        latents = torch.empty(1, 4, height // 8, width // 8)
        context = torch.empty(1, 77, unet_config["cross_attention_dim"])
        ids = torch.zeros(1, 77, dtype=torch.long)
        return {
            "text_encoder": _count(lambda: text(ids)),
            "unet": _count(lambda: unet(latents, torch.tensor(500), encoder_hidden_states=context)),
            "decoder": _count(lambda: decoder.decode(latents)),
        }


def config_flops(config: GeneratorConfig) -> dict[str, Any]:
    """FLOPs per image of ``config`` (module docstring), with the parts and the count of UNet passes."""
    architecture = "sd21" if config.model == SD_TURBO else "sd15"
    parts = part_flops(architecture, config.height, config.width, config.vae != "default")
    guided = config.guidance > 1  # the SD pipelines' rule (no guidance embedding in these UNets)
    unet_passes = config.steps * (2 if guided else 1)
    text = parts["text_encoder"] / config.images_per_group
    per_image = text + unet_passes * parts["unet"] + parts["decoder"]
    return {"recipe": config.recipe, "architecture": architecture, "unet_passes_per_image": unet_passes,
            "tflop_per_image": per_image / 1e12, "tflop_unet_pass": parts["unet"] / 1e12,
            "tflop_decoder": parts["decoder"] / 1e12, "tflop_text_per_image": text / 1e12}


def recipe_table(images_per_group: int = 10, names: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per recipe (``names``, default all), with its FLOPs per image relative to the paper recipe's."""
    wanted = list(RECIPE_NAMES) if names is None else list(names)
    counted = {name: config_flops(GeneratorConfig(backend="diffusers", recipe=name, images_per_group=images_per_group))
               for name in dict.fromkeys([*wanted, "paper"])}
    paper = counted["paper"]["tflop_per_image"]
    rows = [counted[name] for name in wanted]
    for row in rows:
        row["fraction_of_paper"] = row["tflop_per_image"] / paper
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| recipe | UNet passes / image | TFLOP / UNet pass | TFLOP decoder | TFLOP / image | vs paper |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['recipe']} ({r['architecture']}) | {r['unet_passes_per_image']} | {r['tflop_unet_pass']:.3f} "
                     f"| {r['tflop_decoder']:.3f} | {r['tflop_per_image']:.2f} | 1/{1 / r['fraction_of_paper']:.1f} |")
    return "\n".join(lines)
