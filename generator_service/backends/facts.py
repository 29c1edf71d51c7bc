"""What a generator backend is, readable without building it: its config defaults and its needs.

Every registered backend declares one `BackendFacts` (``facts = BackendFacts(...)`` on its class,
or a ``facts`` attribute on a factory function). `GeneratorConfig` reads them through the registry
(`generator_service.backends.backend_facts`) to fill fields left ``None``, to decide which fields
enter the fingerprint and which do not apply, and to validate; the CLI, the preflight checks and
the worker processes read the rest. A backend registered without facts is refused with an error
naming it: there are no silent defaults to fall back on.

Only the model and the sizes have no default here; every other field has a neutral value (no
sampler, no adapter, fp32), so a backend that is not a diffusion model states only what it has.
Plain data: this module imports nothing of the generator, torch or diffusers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: ``lora``: no adapter
NO_LORA = "none"
#: ``vae``: the pipeline's own decoder
DEFAULT_VAE = "default"
#: ``recipe`` of a backend without recipes, ``scheduler`` of one without a sampler
NOT_APPLICABLE = "none"

#: the `GeneratorConfig` fields whose defaults a backend's facts give (in this order)
DEFAULT_FIELDS = ("model", "scheduler", "steps", "guidance", "eta", "height", "width", "save_size",
                  "images_per_group", "dtype", "recipe", "lora", "lora_scale", "vae")


@dataclass(frozen=True)
class BackendFacts:
    """One backend's defaults and needs (see the module docstring).

    Defaults of the `GeneratorConfig` fields left ``None`` (`DEFAULT_FIELDS`): ``model``,
    ``height``, ``width``, ``save_size`` (generated H x W, saved S x S) and the neutral rest.

    Which fields matter:
        pixel_fields: config fields that change pixels; they and the model's identity are hashed
            into the fingerprint (order is irrelevant).
        ignored_fields: fields the backend does not use. Each is set to this backend's default
            (``attention`` and ``compile``: the config's own default); a value given for one is
            warned about unless it is that value or its ``quiet_values`` entry.
        quiet_values: values of ignored fields that pass without a warning (e.g. the paper's
            sampler settings, which a config file shared with another backend carries).

    Validation:
        models: the only model names it knows (None: any folder, hub id or random-weight name).
        schedulers: the scheduler names it accepts (None: any string).
        min_steps: the fewest denoising steps; size_multiple: height and width are multiples of it.

    Behaviour:
        sizes_follow_save_size: unset height and width follow ``save_size`` (and ``save_size`` a
            square height x width): images are rendered at the size they are saved.
        uses_recipes: ``recipe``, ``lora``/``lora_scale`` and ``vae`` apply: the recipe fills fields
            before the defaults, and values other than the paper's enter the fingerprint and welcome.
        host_only: computes on the host whatever device it is given (its workers open no CUDA context).
        loads_diffusers_pipeline: ``model`` is a diffusers pipeline: checked before any worker starts
            (`generator_service.preflight.check_model`), its loading bars kept quiet in workers.
        caption_grammar: draws only captions of the procedural grammar (checked before any worker starts).
        online_groups_per_s: default ``--max-groups-per-s`` when it only serves online (None: no throttle).
    """

    model: str
    height: int
    width: int
    save_size: int
    images_per_group: int = 10
    scheduler: str = NOT_APPLICABLE
    steps: int = 0
    guidance: float = 0.0
    eta: float = 0.0
    dtype: str = "fp32"
    recipe: str = NOT_APPLICABLE
    lora: str = NO_LORA
    lora_scale: float = 1.0
    vae: str = DEFAULT_VAE

    pixel_fields: tuple[str, ...] = ("backend", "height", "width", "save_size")
    ignored_fields: tuple[str, ...] = ()
    quiet_values: Mapping[str, Any] = field(default_factory=dict)

    models: tuple[str, ...] | None = None
    schedulers: tuple[str, ...] | None = None
    min_steps: int = 0
    size_multiple: int = 1

    sizes_follow_save_size: bool = False
    uses_recipes: bool = False
    host_only: bool = False
    loads_diffusers_pipeline: bool = False
    caption_grammar: bool = False
    online_groups_per_s: float | None = None

    def defaults(self) -> dict[str, Any]:
        """The value of every `DEFAULT_FIELDS` field, by name."""
        return {name: getattr(self, name) for name in DEFAULT_FIELDS}
