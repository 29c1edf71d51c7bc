"""The diffusers backend: any diffusers text-to-image pipeline, one seed per image.

- ``config.model``: a local pipeline folder (works offline), a hub id, or "random:sd15" (SD v1.5's
  architecture with seeded random weights, `random_sd15`). Loaded with
  ``DiffusionPipeline.from_pretrained(model, torch_dtype=...)``; the safety checker is disabled.
- ``config.scheduler``: swapped by name with ``SchedulerClass.from_config(pipe.scheduler.config)``
  (`schedulers.SCHEDULERS`; "default" keeps the pipeline's own).
- ``config.attention``: "sdpa" keeps diffusers' default attention (torch scaled_dot_product_attention);
  "xformers" needs the xformers package.
- ``config.compile``: ``torch.compile`` of the denoiser (UNet or transformer) and the VAE decoder.
- ``config.vae``: "default", or "tiny:PATH_OR_ID" / "tiny:random" for diffusers ``AutoencoderTiny``;
  ``config.lora``: an adapter loaded with ``load_lora_weights`` and fused at ``config.lora_scale``
  (`components`).
- On CUDA the denoiser and VAE use channels_last.

A plain ``StableDiffusionPipeline`` runs through our own loop (`denoise.SDLoop`): the same images,
bitwise, without the unconditional batch when guidance <= 1, with each distinct caption encoded
once, and with decode/resize/uint8/copy-to-host of batch k overlapping the denoising of batch k+1
(``submit``; `denoise.Finisher`). Other pipelines are called as they are.

Seeds: image ``j`` of caption ``i`` starts from latents drawn by its own CPU ``torch.Generator``
seeded ``seeds[i][j]`` (diffusers draws one latent per generator when given a list, in the order
prompt-major, image-minor that ``num_images_per_prompt`` produces). A CPU generator makes the
initial noise the same on every device. All B*m images run in one pipeline call.

Its facts (`DiffusersBackend.facts`) reproduce the StableRep paper: Stable Diffusion v1.5, DDIM, 50
steps, eta 0, classifier-free guidance 2.0, 512x512 generation, images saved at 256, 10 images per
caption, fp16; recipes, adapters and decoders apply (`generator_service.recipes`).

The decoded images are resized to ``save_size`` on the device (antialiased bicubic) and converted
to uint8 there; only uint8 ``[B, m, S, S, 3]`` leaves the device.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
from pathlib import Path

import numpy as np

from generator_service.backends import register_backend
from generator_service.backends.base import Backend
from generator_service.backends.facts import BackendFacts
from generator_service.backends.uint8_images import to_uint8_hwc
from generator_service.backends.compile_support import compile_unavailable
from generator_service.backends.adapters import apply_lora, swap_vae
from generator_service.backends.denoise import Finisher, SDLoop, supports_own_loop
from generator_service.config import RANDOM_MODELS
from generator_service.recipes import PAPER_RECIPE
from generator_service.schedulers import DEFAULT_SCHEDULER_NAME, SCHEDULER_NAMES, SCHEDULERS

SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def load_pipeline(model: str, torch_dtype):
    """Load a diffusers pipeline from a folder, a hub id or "random:sd15"; clear errors when it is missing."""
    from diffusers import DiffusionPipeline

    if model in RANDOM_MODELS:
        from generator_service.backends.random_sd15 import build_random_sd15_pipeline

        return build_random_sd15_pipeline(torch_dtype)
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"{path} is a folder but not a diffusers pipeline: it has no model_index.json")
        model_index = json.loads(index_file.read_text())
        source = str(path)
    elif path.is_absolute() or model.startswith((".", "~")) or model.count("/") != 1 or path.exists():
        raise FileNotFoundError(
            f"diffusers model {model!r} not found: no such folder (hub ids look like 'organization/name')"
        )
    else:
        try:
            model_index = DiffusionPipeline.load_config(model)
        except Exception as exc:
            raise OSError(
                f"diffusers model {model!r} is not a local folder and could not be fetched from the hub "
                f"or its local cache ({type(exc).__name__}: {exc})"
            ) from exc
        source = model
    kwargs = {}
    if "safety_checker" in model_index:
        kwargs["safety_checker"] = None
    if "requires_safety_checker" in model_index:
        kwargs["requires_safety_checker"] = False
    from diffusers.pipelines import pipeline_utils

    # Newer diffusers name the argument `dtype` (and deprecate `torch_dtype`).
    kwargs["dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"] = torch_dtype
    return DiffusionPipeline.from_pretrained(source, **kwargs)


def prepare_pipeline(config, torch_dtype):
    """The pipeline of ``config`` on the CPU: loaded, scheduler swapped, decoder swapped, adapter fused."""
    pipe = load_pipeline(config.model, torch_dtype)
    swap_scheduler(pipe, config.scheduler)
    swap_vae(pipe, config.vae, torch_dtype)
    apply_lora(pipe, config.lora, config.lora_scale)
    return pipe


def swap_scheduler(pipe, name: str) -> None:
    """Replace ``pipe.scheduler`` by the scheduler called ``name`` (`schedulers.SCHEDULERS`), keeping its config."""
    if name == DEFAULT_SCHEDULER_NAME:
        return
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULER_NAMES)}")
    import diffusers

    class_name, overrides = SCHEDULERS[name]
    scheduler_class = getattr(diffusers, class_name)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **overrides)


def _denoiser(pipe):
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else getattr(pipe, "transformer", None)


@register_backend("diffusers")
class DiffusersBackend(Backend):
    name = "diffusers"
    facts = BackendFacts(
        model=SD15_HUB_ID,
        height=512,
        width=512,
        save_size=256,
        scheduler="ddim",
        steps=50,
        guidance=2.0,
        eta=0.0,
        dtype="fp16",
        recipe=PAPER_RECIPE,
        pixel_fields=("backend", "scheduler", "steps", "guidance", "eta", "height", "width", "save_size", "dtype"),
        schedulers=SCHEDULER_NAMES,
        min_steps=1,
        size_multiple=8,
        uses_recipes=True,
        loads_diffusers_pipeline=True,
    )

    def __init__(self, config, device: str = "cpu") -> None:
        if config.backend != "diffusers":
            raise ValueError(f"DiffusersBackend needs config.backend='diffusers', got {config.backend!r}")
        super().__init__(config, device)
        import torch

        self.torch = torch
        self.torch_device = torch.device(device)
        if config.compile:  # checked before loading weights: inductor would fail only at the first call
            reason = compile_unavailable(self.torch_device.type)
            if reason is not None:
                raise ValueError(f"compile=True on {self.torch_device}: {reason} (or run without --compile)")
        dtype = getattr(torch, TORCH_DTYPES[config.dtype])
        pipe = prepare_pipeline(config, dtype)
        if config.attention == "xformers":
            if importlib.util.find_spec("xformers") is None:
                raise ValueError("attention='xformers' needs the xformers package: pip install 'stablerep[xformers]'")
            pipe.enable_xformers_memory_efficient_attention()
        pipe = pipe.to(self.torch_device)
        denoiser, vae = _denoiser(pipe), getattr(pipe, "vae", None)
        if self.torch_device.type == "cuda":
            for module in (denoiser, vae):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        if config.compile:
            if denoiser is not None:
                denoiser.compile()
            if vae is not None:
                vae.decoder.compile()
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self._call_parameters = set(inspect.signature(pipe.__call__).parameters)
        for required in ("prompt", "num_images_per_prompt", "generator", "output_type"):
            if required not in self._call_parameters:
                raise ValueError(f"pipeline {type(pipe).__name__} of {config.model!r} does not take {required!r}: not a text-to-image pipeline")
        self.loop = SDLoop(pipe, config, self.torch_device) if supports_own_loop(pipe) else None
        self.finisher: Finisher | None = None
        self.static_batch = bool(config.compile)  # compiled: every batch padded to one shape (worker.generate_task)

    def pipeline_kwargs(self, captions: list[str], seeds: list[list[int]]) -> dict:
        """The keyword arguments of the one pipeline call that generates every image of the batch."""
        generators = [self.torch.Generator("cpu").manual_seed(seed) for group in seeds for seed in group]
        kwargs = dict(
            prompt=captions,
            num_images_per_prompt=len(seeds[0]),
            generator=generators,
            num_inference_steps=self.config.steps,
            guidance_scale=self.config.guidance,
            eta=self.config.eta,
            height=self.config.height,
            width=self.config.width,
            output_type="pt",
        )
        return {key: value for key, value in kwargs.items() if key in self._call_parameters}

    def _generate(self, captions: list[str], seeds: list[list[int]]) -> np.ndarray:
        """uint8 [B, m, S, S, 3]: all B*m images in one batch, resize and uint8 conversion on the device."""
        torch = self.torch
        b, m, size = len(captions), len(seeds[0]), self.config.save_size
        with torch.inference_mode():
            if self.loop is not None:
                images = self.loop.decode(self.loop.denoise(captions, seeds))
            else:
                images = self.pipe(**self.pipeline_kwargs(captions, seeds)).images
                images = to_uint8_hwc(images, size, self.torch_device)
        return images.cpu().numpy().reshape(b, m, size, size, 3)

    def submit(self, captions, seeds, done, failed) -> None:
        """Denoise this batch now; decode it in the finisher while the caller submits the next one."""
        if self.loop is None:
            return super().submit(captions, seeds, done, failed)
        captions, seeds = self.check_request(captions, seeds)
        b, m, size = len(captions), len(seeds[0]), self.config.save_size
        with self.torch.inference_mode():
            latents = self.loop.denoise(captions, seeds)
        if self.finisher is None:
            self.finisher = Finisher(self.loop.decode, self.torch_device)
        self.finisher.submit(latents, (b, m, size, size, 3), lambda images: done(self.check_result(images, b, m)), failed)

    def drain(self) -> None:
        if self.finisher is not None:
            self.finisher.wait()

    def close(self) -> None:
        if self.finisher is not None:
            self.finisher.close()
            self.finisher = None
        self.pipe = None
        if self.torch_device.type == "cuda":
            self.torch.cuda.empty_cache()

