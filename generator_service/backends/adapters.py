"""Swappable parts of a diffusers pipeline: a LoRA adapter (fused) and a light decoder (TAESD).

- ``apply_lora(pipe, lora, scale)``: ``pipe.load_lora_weights(lora)`` (diffusers, through peft),
  then ``fuse_lora(lora_scale=scale)`` and ``unload_lora_weights()``: the adapter's low-rank update
  is folded into the base weights, so a step costs what it cost without the adapter.
- ``tiny_vae(spec, pipe, dtype)``: diffusers ``AutoencoderTiny`` (the TAESD family) in place of the
  pipeline's VAE. ``tiny:random`` is TAESD's architecture (AutoencoderTiny's default config,
  2.4M parameters) with weights drawn under a fixed seed, as "random:sd15" does for the UNet;
  ``tiny:PATH_OR_ID`` loads ``AutoencoderTiny.from_pretrained``. TAESD decodes the same scaled
  latents the UNet denoises (its ``scaling_factor`` is 1), so the pipeline's decode call is unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

from generator_service.config import NO_LORA, TINY_VAE_PREFIX, TINY_VAE_RANDOM

TINY_VAE_RANDOM_SEED = 0


def _looks_local(name: str) -> bool:
    path = Path(os.path.expanduser(name))
    return path.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1 or path.exists()


def apply_lora(pipe, lora: str, scale: float) -> None:
    """Load adapter ``lora`` (folder, ``.safetensors`` file or hub id) into ``pipe`` and fuse it at ``scale``."""
    if lora == NO_LORA:
        return
    if not hasattr(pipe, "load_lora_weights"):
        raise ValueError(f"pipeline {type(pipe).__name__} cannot load LoRA adapters (lora={lora!r})")
    path = Path(os.path.expanduser(lora))
    if _looks_local(lora) and not path.exists():
        raise FileNotFoundError(f"LoRA adapter {lora!r} not found: no such file or folder (hub ids look like 'organization/name')")
    try:
        pipe.load_lora_weights(str(path) if path.exists() else lora)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"LoRA adapter {lora!r} could not be loaded into {type(pipe).__name__}: {exc}") from exc
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()  # the fused weights stay; the peft layers go


def decoder_scale_factor(vae) -> int:
    """Pixels per latent along a side: 2 ** (levels - 1) (AutoencoderKL) or upsampling_scaling_factor ** (levels - 1)."""
    config = vae.config
    levels = len(config.block_out_channels)
    return int(getattr(config, "upsampling_scaling_factor", 2)) ** (levels - 1)


def tiny_vae(spec: str, pipe, dtype):
    """The ``AutoencoderTiny`` named by ``spec`` ("tiny:random" or "tiny:PATH_OR_ID"), checked against ``pipe``."""
    import torch
    from diffusers import AutoencoderTiny

    if not spec.startswith(TINY_VAE_PREFIX):
        raise ValueError(f"vae={spec!r}: expected 'tiny:PATH_OR_ID' or {TINY_VAE_RANDOM!r}")
    source = spec[len(TINY_VAE_PREFIX):]
    if spec == TINY_VAE_RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_VAE_RANDOM_SEED)
            vae = AutoencoderTiny()
    else:
        path = Path(os.path.expanduser(source))
        if _looks_local(source) and not path.is_dir():
            raise FileNotFoundError(f"tiny VAE {source!r} not found: no such folder (hub ids look like 'organization/name')")
        try:
            vae = AutoencoderTiny.from_pretrained(str(path) if path.is_dir() else source)
        except (OSError, ValueError) as exc:
            raise ValueError(f"vae={spec!r}: not an AutoencoderTiny ({type(exc).__name__}: {exc})") from exc
    expected_factor = getattr(pipe, "vae_scale_factor", None)
    if expected_factor is not None and decoder_scale_factor(vae) != expected_factor:
        raise ValueError(
            f"vae={spec!r} upsamples latents {decoder_scale_factor(vae)}x but the pipeline's latents are "
            f"1/{expected_factor} of the image side: not a decoder for this model"
        )
    unet = getattr(pipe, "unet", None)
    if unet is not None and vae.config.latent_channels != unet.config.in_channels:
        raise ValueError(
            f"vae={spec!r} decodes {vae.config.latent_channels}-channel latents, the model makes {unet.config.in_channels}"
        )
    return vae.to(dtype=dtype)


def swap_vae(pipe, spec: str, dtype) -> None:
    """Put ``tiny_vae(spec)`` in place of ``pipe.vae`` (no-op for "default")."""
    if spec.startswith(TINY_VAE_PREFIX):
        pipe.register_modules(vae=tiny_vae(spec, pipe, dtype))
