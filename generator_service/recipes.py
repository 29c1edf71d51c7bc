"""Named sampler recipes of the diffusers backend: plain data, no torch or diffusers import.

A recipe sets defaults for `GeneratorConfig` fields; any field given explicitly (flag, YAML key,
``from_dict`` entry) overrides it, and fields neither sets take the backend's defaults. The recipe
name itself is a config field and part of the fingerprint (`config.GeneratorConfig.fingerprint`).

| recipe | sampler | UNet calls per image | what it assumes about the weights |
|---|---|---:|---|
| paper | DDIM 50, eta 0, CFG 2 | 100 | SD v1.5 (the paper's model) |
| dpm20 | DPM-Solver++ 20, CFG 2 | 40 | any SD1.x/2.x epsilon model: a training-free solver swap |
| lcm4 | LCM 4 steps, no CFG | 4 | SD v1.5 plus the LCM-LoRA adapter (`latent-consistency/lcm-lora-sdv15`, fused) |
| turbo | Euler, trailing, 1 step, no CFG | 1 | a guidance-distilled model (`stabilityai/sd-turbo`, SD 2.1 architecture) |
| turbo-tiny | turbo with the TAESD decoder | 1 | turbo's model plus TAESD (`madebyollin/taesd`), an approximate SD VAE decoder |

Every recipe generates at 512 x 512, the resolution these weights were trained at; the images
are saved at the config's ``save_size`` (256 by default) as in the paper. Recipes that name
adapters or models from the hub need them downloaded once (or ``--lora none`` / ``--model`` /
``--vae default`` to override); FLOPs per image of each recipe: ``docs/fast-generation.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PAPER_RECIPE = "paper"
LCM_LORA_SD15 = "latent-consistency/lcm-lora-sdv15"
SD_TURBO = "stabilityai/sd-turbo"
TAESD = "madebyollin/taesd"


@dataclass(frozen=True)
class Recipe:
    """Defaults for `GeneratorConfig` fields (``settings``) and what they assume about the weights."""

    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    assumes: str = ""


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            "paper",
            dict(scheduler="ddim", steps=50, guidance=2.0, eta=0.0, height=512, width=512),
            "SD v1.5, the paper's model: DDIM 50 steps, classifier-free guidance 2 (two UNet passes per step)",
        ),
        Recipe(
            "dpm20",
            dict(scheduler="dpm++", steps=20, guidance=2.0, eta=0.0, height=512, width=512),
            "any SD epsilon-prediction model: the DPM-Solver++ multistep solver needs no retraining",
        ),
        Recipe(
            "lcm4",
            dict(scheduler="lcm", steps=4, guidance=1.0, eta=0.0, height=512, width=512, lora=LCM_LORA_SD15,
                 lora_scale=1.0),
            "SD v1.5 with the LCM-LoRA adapter fused (or an LCM-distilled model with --lora none); no CFG",
        ),
        Recipe(
            "turbo",
            dict(model=SD_TURBO, scheduler="euler-trailing", steps=1, guidance=0.0, eta=0.0, height=512, width=512),
            "a guidance-distilled (adversarial diffusion distillation) model such as SD-Turbo; 1-4 steps, no CFG",
        ),
        Recipe(
            "turbo-tiny",
            dict(model=SD_TURBO, scheduler="euler-trailing", steps=1, guidance=0.0, eta=0.0, height=512, width=512,
                 vae=f"tiny:{TAESD}"),
            "turbo's model, decoded by TAESD (AutoencoderTiny), a distilled approximation of the SD VAE decoder",
        ),
    )
}
RECIPE_NAMES: tuple[str, ...] = tuple(RECIPES)


def recipe_settings(name: str) -> dict[str, Any]:
    """The field defaults of recipe ``name``; a clear error naming the known recipes otherwise."""
    try:
        return dict(RECIPES[name].settings)
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPE_NAMES)}") from None
