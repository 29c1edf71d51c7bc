"""The generator configuration: one frozen, JSON-round-trippable dataclass.

Defaults depend on the backend. A field left as ``None`` takes its backend's default when the
config is built (see `BACKEND_DEFAULTS`):

- ``diffusers`` reproduces the StableRep paper: Stable Diffusion v1.5, DDIM, 50 steps, eta 0,
  classifier-free guidance 2.0, 512x512 generation, images saved at 256, 10 images per caption, fp16.
- ``procedural`` (the embedded default, CPU only, no weights) renders 64x64 images saved at 64,
  10 per caption; when only ``save_size`` is given, height and width follow it (and the reverse
  for a square height x width), so images are rendered at the size they are saved. The diffusion settings (scheduler, steps, guidance, eta, dtype, attention,
  compile) do not apply to it; they are set to "not applicable" values ("none", 0, 0.0, "fp32",
  "sdpa", False); a warning names any such field that was set to a value other than None, that
  "not applicable" value or the diffusers default.

The fingerprint is a short hash of the fields that change pixels plus the model's identity; it
travels with every group so that images from different generators are never mixed unknowingly.
Random-weight models ("random:sd15") are marked in the fingerprint (suffix "-random-sd15").
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

from generator_service.schedulers import SCHEDULER_NAMES
from protocol import GeneratorInfo

PROCEDURAL_MODEL = "procedural-v1"
SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
RANDOM_MODEL_PREFIX = "random:"
RANDOM_MODELS = ("random:sd15",)

DTYPES = ("fp16", "bf16", "fp32")
ATTENTIONS = ("sdpa", "xformers")

BACKEND_DEFAULTS: dict[str, dict[str, Any]] = {
    "diffusers": {
        "model": SD15_HUB_ID,
        "scheduler": "ddim",
        "steps": 50,
        "guidance": 2.0,
        "eta": 0.0,
        "height": 512,
        "width": 512,
        "save_size": 256,
        "images_per_group": 10,
        "dtype": "fp16",
    },
    "procedural": {
        "model": PROCEDURAL_MODEL,
        "scheduler": "none",
        "steps": 0,
        "guidance": 0.0,
        "eta": 0.0,
        "height": 64,
        "width": 64,
        "save_size": 64,
        "images_per_group": 10,
        "dtype": "fp32",
    },
}

# Fields that do not apply to the procedural renderer, with their "not applicable" values.
_PROCEDURAL_NOT_APPLICABLE: dict[str, Any] = {
    "scheduler": "none",
    "steps": 0,
    "guidance": 0.0,
    "eta": 0.0,
    "dtype": "fp32",
    "attention": "sdpa",
    "compile": False,
}

# Fields that change the pixels, per backend (the model's identity is hashed separately).
_PIXEL_FIELDS: dict[str, tuple[str, ...]] = {
    "procedural": ("backend", "height", "width", "save_size"),
    "diffusers": ("backend", "scheduler", "steps", "guidance", "eta", "height", "width", "save_size", "dtype"),
}
_ALL_PIXEL_FIELDS = _PIXEL_FIELDS["diffusers"]


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

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError(f"GeneratorConfig.backend must be a non-empty string, got {self.backend!r}")
        defaults = BACKEND_DEFAULTS.get(self.backend, BACKEND_DEFAULTS["diffusers"])
        if self.backend == "procedural":
            for name, value in _PROCEDURAL_NOT_APPLICABLE.items():
                current = getattr(self, name)
                if current is not None and current != value and current != BACKEND_DEFAULTS["diffusers"].get(name):
                    warnings.warn(
                        f"GeneratorConfig.{name}={current!r} does not apply to the procedural backend; ignored",
                        stacklevel=3,
                    )
                object.__setattr__(self, name, value)
            # Rendering directly at the save size is cheapest: sizes left unset follow the one given.
            if self.save_size is not None:
                for name in ("height", "width"):
                    if getattr(self, name) is None:
                        object.__setattr__(self, name, self.save_size)
            elif self.height is not None and self.height == self.width:
                object.__setattr__(self, "save_size", self.height)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
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
        if self.backend == "procedural" and self.model != PROCEDURAL_MODEL:
            fail("model", f"the procedural backend only knows model {PROCEDURAL_MODEL!r}")
        check_int("steps", 0 if self.backend == "procedural" else 1)
        check_float("guidance", 0.0)
        check_float("eta", 0.0, 1.0)
        check_int("height", 8)
        check_int("width", 8)
        check_int("save_size", 8)
        check_int("images_per_group", 1)
        if self.backend == "diffusers":
            if self.scheduler not in SCHEDULER_NAMES:
                fail("scheduler", f"unknown scheduler; known: {', '.join(SCHEDULER_NAMES)}")
            for name in ("height", "width"):
                if getattr(self, name) % 8:
                    fail(name, "must be a multiple of 8 for diffusion models")
        elif not isinstance(self.scheduler, str):
            fail("scheduler", "must be a string")
        if self.dtype not in DTYPES:
            fail("dtype", f"must be one of {', '.join(DTYPES)}")
        if self.attention not in ATTENTIONS:
            fail("attention", f"must be one of {', '.join(ATTENTIONS)}")
        if not isinstance(self.compile, bool):
            fail("compile", "must be true or false")

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
        Fields that do not change pixels (images_per_group, attention, compile) are left out.
        """
        cached = self.__dict__.get("_fingerprint")
        if cached is not None:
            return cached
        names = _PIXEL_FIELDS.get(self.backend, _ALL_PIXEL_FIELDS)
        payload = {name: getattr(self, name) for name in names}
        payload["model"] = model_identity(self.model)
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
        )


_HEAD_TAIL_BYTES = 1 << 20


def model_identity(model: str) -> str:
    """A string naming the model's content.

    A local pipeline folder is identified by its contents, not its path: every file's relative
    path and size, the full text of its JSON/TXT files and the first and last MiB of the others
    (weights), so a moved folder keeps its identity and re-saved weights change it. Hub ids and
    "random:*" names identify themselves.
    """
    path = Path(os.path.expanduser(model))
    if not path.is_dir():
        return model
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        size = file.stat().st_size
        digest.update(f"{rel}\0{size}\0".encode())
        with open(file, "rb") as handle:
            if file.suffix in (".json", ".txt") or size <= 2 * _HEAD_TAIL_BYTES:
                digest.update(handle.read())
            else:
                digest.update(handle.read(_HEAD_TAIL_BYTES))
                handle.seek(size - _HEAD_TAIL_BYTES)
                digest.update(handle.read(_HEAD_TAIL_BYTES))
    return f"local:{digest.hexdigest()}"
