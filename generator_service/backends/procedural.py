"""The procedural backend: the embedded default, CPU only, no weights.

Captions must follow `generator_service.procedural.grammar`. Images are rendered at
``config.height x config.width`` and, when that differs from ``save_size``, resized to
``save_size x save_size`` with antialiased bilinear interpolation (torch). Rendering is numpy on
the CPU whatever ``device`` says.

Its facts (`ProceduralBackend.facts`): model "procedural-v1", 64x64 images saved at 64, 10 per
caption; when only ``save_size`` is given, height and width follow it (and the reverse for a square
height x width). The diffusion settings (scheduler, steps, guidance, eta, dtype, attention, compile,
recipe, lora, vae) do not apply: they are set to "not applicable" values ("none", 0, 0.0, "fp32",
"sdpa", False, "none", "none", 1.0, "default"), and a warning names any given another value than
that or the paper's. Only height, width and save_size (and the model) enter the fingerprint.
"""

from __future__ import annotations

import numpy as np

from generator_service.backends import register_backend
from generator_service.backends.base import Backend
from generator_service.backends.facts import BackendFacts
from generator_service.recipes import PAPER_RECIPE, recipe_settings
from generator_service.procedural.grammar import parse_caption
from generator_service.procedural.render import render


PROCEDURAL_MODEL = "procedural-v1"
#: default --max-groups-per-s serving online: it renders thousands of groups/s, a CPU trainer draws
#: tens to a hundred, and the surplus is evicted unseen while taking the trainer's cores
PROCEDURAL_ONLINE_GROUPS_PER_S = 50.0
#: the paper's sampler settings: a config shared with the diffusers backend carries them, so they are
#: dropped without a warning
PAPER_SAMPLER = {**recipe_settings(PAPER_RECIPE), "dtype": "fp16", "recipe": PAPER_RECIPE}


@register_backend("procedural")
class ProceduralBackend(Backend):
    name = "procedural"
    facts = BackendFacts(
        model=PROCEDURAL_MODEL,
        height=64,
        width=64,
        save_size=64,
        models=(PROCEDURAL_MODEL,),
        ignored_fields=("scheduler", "steps", "guidance", "eta", "dtype", "attention", "compile", "recipe", "lora",
                        "lora_scale", "vae"),
        quiet_values=PAPER_SAMPLER,
        sizes_follow_save_size=True,
        host_only=True,
        caption_grammar=True,
        online_groups_per_s=PROCEDURAL_ONLINE_GROUPS_PER_S,
    )

    def __init__(self, config, device: str = "cpu") -> None:
        if config.backend != "procedural":
            raise ValueError(f"ProceduralBackend needs config.backend='procedural', got {config.backend!r}")
        super().__init__(config, device)

    def _generate(self, captions: list[str], seeds: list[list[int]]) -> np.ndarray:
        """uint8 [B, m, S, S, 3]; every caption is parsed first, so a bad one fails before any rendering."""
        parsed = [parse_caption(caption) for caption in captions]
        b, m = len(captions), len(seeds[0])
        flat_attributes = [attrs for attrs in parsed for _ in range(m)]
        flat_seeds = [seed for group in seeds for seed in group]
        height, width, size = self.config.height, self.config.width, self.config.save_size
        images = render(flat_attributes, flat_seeds, height, width)
        if (height, width) != (size, size):
            images = _resize(images, size)
        return images.reshape(b, m, size, size, 3)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> uint8 [N, size, size, 3], antialiased bilinear."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
