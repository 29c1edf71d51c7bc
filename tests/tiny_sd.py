"""Tiny random-weight diffusers parts for tests, saved to disk like real ones.

``make_tiny_sd_pipeline`` (the pipeline itself) lives in ``generator_service.backends.tiny_sd``, since
``stablerep-bench generator-sweep --quick`` builds one too; the LoRA adapter and TAESD decoder for it
are here.
"""

from __future__ import annotations

from pathlib import Path

from generator_service.backends.tiny_sd import TINY_SEED, make_tiny_sd_pipeline

__all__ = ["TINY_SEED", "make_tiny_lora", "make_tiny_sd_pipeline", "make_tiny_taesd"]


def make_tiny_lora(directory: str | Path, pipeline_path: str | Path, seed: int = TINY_SEED, rank: int = 4,
                   strength: float = 8.0) -> Path:
    """A random LoRA adapter for the tiny pipeline's UNet, made with peft and saved like a real one.

    ``init_lora_weights=False`` draws both low-rank factors at random (peft's default zeroes B), and
    B is scaled by ``strength``, so the adapter visibly changes the tiny model's images. Saved with ``save_lora_weights`` as ``pytorch_lora_weights.safetensors``.
    """
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    directory = Path(directory)
    unet = UNet2DConditionModel.from_pretrained(Path(pipeline_path) / "unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = {name: value * strength if "lora_B" in name else value
              for name, value in get_peft_model_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers)
    return directory


def make_tiny_taesd(directory: str | Path, seed: int = TINY_SEED) -> Path:
    """A random AutoencoderTiny whose decoder upsamples 2x, as the tiny pipeline's VAE does; saved to ``directory``."""
    import torch
    from diffusers import AutoencoderTiny

    directory = Path(directory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                              num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))
    vae.save_pretrained(directory)
    return directory
