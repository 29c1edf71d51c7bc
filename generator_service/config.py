"""The generator configuration: one frozen, JSON-round-trippable dataclass.

Defaults depend on the backend. A field left as ``None`` takes its backend's default when the
config is built; each backend declares its defaults, the fields that change its pixels and the
fields that do not apply to it in its `BackendFacts` (``generator_service.backends.facts``), read
here through the registry (`generator_service.backends.backend_facts`). The built-in ones:

- ``diffusers`` reproduces the StableRep paper: Stable Diffusion v1.5, DDIM, 50 steps, eta 0,
  classifier-free guidance 2.0, 512x512 generation, images saved at 256, 10 images per caption, fp16.
- ``procedural`` (the embedded default, CPU only, no weights) renders 64x64 images saved at 64,
  10 per caption; when only ``save_size`` is given, height and width follow it (and the reverse
  for a square height x width), so images are rendered at the size they are saved. The diffusion
  settings (scheduler, steps, guidance, eta, dtype, attention, compile) do not apply to it; they
  are set to "not applicable" values ("none", 0, 0.0, "fp32", "sdpa", False); a warning names any
  such field that was set to a value other than None, that "not applicable" value or the paper's.

A backend name the registry does not know, or a backend registered without facts, is an error
naming it.

The fingerprint is a short hash of the fields that change pixels plus the model's identity; it
travels with every group so that images from different generators are never mixed unknowingly.
Random-weight models ("random:sd15") are marked in the fingerprint (suffix "-random-sd15").

Recipes (`generator_service.recipes`): ``recipe`` names a set of sampler defaults of backends that
use recipes (diffusers; "paper", its default, is the paper's settings). Precedence for every field:
the value given explicitly, then the recipe's, then the backend's default. ``lora`` (an adapter
folder, file or hub id, or "none") is loaded and fused at ``lora_scale``; ``vae`` is "default" (the
pipeline's own) or "tiny:PATH_OR_ID" / "tiny:random" (diffusers ``AutoencoderTiny``, TAESD).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from generator_service.backends import backend_facts
from generator_service.backends.facts import DEFAULT_VAE, NO_LORA, BackendFacts
from generator_service.recipes import PAPER_RECIPE, RECIPE_NAMES, recipe_settings
from protocol import GeneratorInfo

RANDOM_MODEL_PREFIX = "random:"
RANDOM_MODELS = ("random:sd15",)

DTYPES = ("fp16", "bf16", "fp32")
TINY_VAE_PREFIX = "tiny:"
TINY_VAE_RANDOM = "tiny:random"
ATTENTIONS = ("sdpa", "xformers")

__all__ = ["ATTENTIONS", "DEFAULT_VAE", "DTYPES", "NO_LORA", "RANDOM_MODELS", "TINY_VAE_PREFIX", "TINY_VAE_RANDOM",
           "GeneratorConfig", "model_identity"]


@dataclass(frozen=True)
class GeneratorConfig:
    """What generates the images and how. ``None`` means "the backend's default" (module docstring).

    Output images are uint8 ``[m, save_size, save_size, 3]`` per caption group, m = images_per_group.
    """

    backend: str = "procedural"
    model: str | None = None
    scheduler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    eta: float | None = None
    height: int | None = None
    width: int | None = None
    save_size: int | None = None
    images_per_group: int | None = None
    dtype: str | None = None
    attention: str = "sdpa"
    compile: bool = False
    recipe: str | None = None
    lora: str | None = None
    lora_scale: float | None = None
    vae: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError(f"GeneratorConfig.backend must be a non-empty string, got {self.backend!r}")
        facts = _checked_facts(self.backend)
        own_defaults = facts.defaults()
        for name in facts.ignored_fields:
            value = own_defaults.get(name, _FIELD_DEFAULTS[name])
            current = getattr(self, name)
            if current is not None and current != value and current != facts.quiet_values.get(name):
                warnings.warn(
                    f"GeneratorConfig.{name}={current!r} does not apply to the {self.backend} backend; ignored",
                    stacklevel=3,
                )
            object.__setattr__(self, name, value)
        if facts.sizes_follow_save_size:
            # Rendering directly at the save size is cheapest: sizes left unset follow the one given.
            if self.save_size is not None:
                for name in ("height", "width"):
                    if getattr(self, name) is None:
                        object.__setattr__(self, name, self.save_size)
            elif self.height is not None and self.height == self.width:
                object.__setattr__(self, "save_size", self.height)
        if facts.uses_recipes:
            if self.recipe is None:
                object.__setattr__(self, "recipe", facts.recipe)
            if self.recipe not in RECIPE_NAMES:
                raise ValueError(f"GeneratorConfig.recipe={self.recipe!r}: unknown recipe; known: {', '.join(RECIPE_NAMES)}")
            for name, value in recipe_settings(self.recipe).items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
        for name, value in own_defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        self._validate(facts)

    # ------------------------------------------------------------------ validation
    def _validate(self, facts: BackendFacts) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"GeneratorConfig.{name}={getattr(self, name)!r}: {why}")

        def check_int(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                fail(name, "must be an integer")
            if value < minimum:
                fail(name, f"must be >= {minimum}")

        def check_float(name: str, low: float, high: float | None = None) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                fail(name, "must be a number")
            object.__setattr__(self, name, float(value))
            if value < low or (high is not None and value > high):
                fail(name, f"must be in [{low}, {high if high is not None else 'inf'}]")

        if not isinstance(self.model, str) or not self.model:
            fail("model", "must be a non-empty string (a path, a hub id or 'random:sd15')")
        if self.model.startswith(RANDOM_MODEL_PREFIX) and self.model not in RANDOM_MODELS:
            fail("model", f"unknown random-weight model; known: {', '.join(RANDOM_MODELS)}")
        if facts.models is not None and self.model not in facts.models:
            known = ", ".join(repr(model) for model in facts.models)
            fail("model", f"the {self.backend} backend only knows model{'s' if len(facts.models) > 1 else ''} {known}")
        check_int("steps", facts.min_steps)
        check_float("guidance", 0.0)
        check_float("eta", 0.0, 1.0)
        check_int("height", 8)
        check_int("width", 8)
        check_int("save_size", 8)
        check_int("images_per_group", 1)
        if facts.schedulers is not None and self.scheduler not in facts.schedulers:
            fail("scheduler", f"unknown scheduler; known: {', '.join(facts.schedulers)}")
        if not isinstance(self.scheduler, str):
            fail("scheduler", "must be a string")
        for name in ("height", "width"):
            if getattr(self, name) % facts.size_multiple:
                fail(name, f"must be a multiple of {facts.size_multiple} for the {self.backend} backend")
        if self.dtype not in DTYPES:
            fail("dtype", f"must be one of {', '.join(DTYPES)}")
        if self.attention not in ATTENTIONS:
            fail("attention", f"must be one of {', '.join(ATTENTIONS)}")
        if not isinstance(self.compile, bool):
            fail("compile", "must be true or false")
        if not isinstance(self.recipe, str):
            fail("recipe", "must be a string")
        if not isinstance(self.lora, str) or not self.lora.strip():
            fail("lora", f"must be an adapter folder, file or hub id, or {NO_LORA!r}")
        check_float("lora_scale", -100.0, 100.0)
        if not isinstance(self.vae, str) or not (
            self.vae == DEFAULT_VAE or (self.vae.startswith(TINY_VAE_PREFIX) and self.vae[len(TINY_VAE_PREFIX):].strip())
        ):
            fail("vae", f"must be {DEFAULT_VAE!r}, 'tiny:PATH_OR_ID' or {TINY_VAE_RANDOM!r}")

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        """All fields, resolved (no ``None``), as plain JSON types."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GeneratorConfig":
        """Build from a dict; missing fields take the backend defaults; unknown fields are an error."""
        if not isinstance(data, dict):
            raise ValueError(f"GeneratorConfig.from_dict expects a dict, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(
                f"unknown GeneratorConfig field(s): {', '.join(unknown)}; known fields: {', '.join(known)}"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> "GeneratorConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ identity
    @property
    def is_random_weights(self) -> bool:
        return self.model.startswith(RANDOM_MODEL_PREFIX)

    def fingerprint(self) -> str:
        """Short stable id: 16 hex chars of SHA-256 over the pixel fields and the model identity.

        Random-weight models get the suffix ``-random-<name>`` (e.g. ``3fa9c2e1b7d04c55-random-sd15``).
        Fields that do not change pixels (images_per_group, attention, compile) are left out. The
        recipe name, the adapter (its content identity, `model_identity`, and scale) and the decoder
        (its identity) enter the hash when they differ from the paper's ("paper", "none", "default"),
        so the fingerprints of configs without them are those of earlier versions.
        """
        cached = self.__dict__.get("_fingerprint")
        if cached is not None:
            return cached
        facts = backend_facts(self.backend)
        payload = {name: getattr(self, name) for name in facts.pixel_fields}
        payload["model"] = model_identity(self.model)
        if facts.uses_recipes:
            if self.recipe != PAPER_RECIPE:
                payload["recipe"] = self.recipe
            if self.lora != NO_LORA:
                payload["lora"] = model_identity(self.lora)
                payload["lora_scale"] = self.lora_scale
            if self.vae != DEFAULT_VAE:
                payload["vae"] = TINY_VAE_PREFIX + model_identity(self.vae[len(TINY_VAE_PREFIX):])
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
        if self.is_random_weights:
            digest = f"{digest}-random-{self.model[len(RANDOM_MODEL_PREFIX):]}"
        object.__setattr__(self, "_fingerprint", digest)  # computed once per config (local folders are read)
        return digest

    def welcome_info(self) -> GeneratorInfo:
        """The generator description of protocol v1 (``welcome.generator``, manifest ``generator``)."""
        return GeneratorInfo(
            backend=self.backend,
            model=self.model,
            scheduler=self.scheduler,
            steps=self.steps,
            guidance=self.guidance,
            height=self.height,
            width=self.width,
            save_size=self.save_size,
            images_per_group=self.images_per_group,
            fingerprint=self.fingerprint(),
            extra=self._recipe_extra(),
        )

    def _recipe_extra(self) -> dict[str, Any] | None:
        """``GeneratorInfo.extra``: recipe, adapter and decoder, when any differs from the paper's."""
        if not backend_facts(self.backend).uses_recipes or (self.recipe, self.lora, self.vae) == (
            PAPER_RECIPE, NO_LORA, DEFAULT_VAE
        ):
            return None
        return {"recipe": self.recipe, "lora": self.lora, "lora_scale": self.lora_scale, "vae": self.vae}


#: the class defaults of the fields a backend may ignore without giving a default (attention, compile)
_FIELD_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(GeneratorConfig)}


def _checked_facts(backend: str) -> BackendFacts:
    """``backend_facts(backend)``, its field names checked against `GeneratorConfig` (an error names the backend)."""
    facts = backend_facts(backend)
    unknown = sorted(set(facts.pixel_fields + facts.ignored_fields) - set(_FIELD_DEFAULTS))
    if unknown:
        raise ValueError(f"generator backend {backend!r}: its BackendFacts name unknown GeneratorConfig field(s): "
                         f"{', '.join(unknown)}")
    return facts


_HEAD_TAIL_BYTES = 1 << 20


def model_identity(model: str) -> str:
    """A string naming the content of a model, adapter or decoder.

    A local folder is identified by its contents, not its path: every file's relative path and
    size, the full text of its JSON/TXT files and the first and last MiB of the others (weights),
    so a moved folder keeps its identity and re-saved weights change it. A local file (e.g. one
    LoRA ``.safetensors``) is identified the same way by its size and bytes. Hub ids and
    "random*" names identify themselves.
    """
    path = Path(os.path.expanduser(model))
    if path.is_file():
        digest = hashlib.sha256(f"{path.stat().st_size}\0".encode())
        _hash_content(digest, path)
        return f"local-file:{digest.hexdigest()}"
    if not path.is_dir():
        return model
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        digest.update(f"{rel}\0{file.stat().st_size}\0".encode())
        _hash_content(digest, file)
    return f"local:{digest.hexdigest()}"


def _hash_content(digest, file: Path) -> None:
    """Feed ``digest`` a JSON/TXT file or a small file whole, else its first and last MiB."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        if file.suffix in (".json", ".txt") or size <= 2 * _HEAD_TAIL_BYTES:
            digest.update(handle.read())
        else:
            digest.update(handle.read(_HEAD_TAIL_BYTES))
            handle.seek(size - _HEAD_TAIL_BYTES)
            digest.update(handle.read(_HEAD_TAIL_BYTES))
