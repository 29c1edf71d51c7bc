"""A tiny random-weight Stable Diffusion pipeline, saved to disk like a real one.

``make_tiny_sd_pipeline(directory)`` builds a StableDiffusionPipeline from tiny seeded components
(UNet2DConditionModel, AutoencoderKL, CLIPTextModel, a small CLIP BPE tokenizer written from a
vocabulary and merge list in code, DDIM scheduler), saves it with ``save_pretrained`` and returns
the folder, so it loads through the same ``DiffusionPipeline.from_pretrained`` path as a real model.
A 32x32, 2-step generation takes a fraction of a second on a CPU: the tests use it, and so does
``stablerep-bench generator-sweep --quick`` (a smoke run of the code path, not a speed measurement).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

TINY_SEED = 0


def make_tiny_sd_pipeline(directory: str | Path, seed: int = TINY_SEED) -> Path:
    """Build, seed and save the tiny pipeline under ``directory``; returns that folder."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from generator_service.backends.random_sd15 import SD15_SCHEDULER_CONFIG, write_clip_tokenizer_files

    directory = Path(directory)
    with tempfile.TemporaryDirectory() as folder:
        write_clip_tokenizer_files(folder, model_max_length=77)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            cross_attention_dim=16,
            attention_head_dim=4,
            norm_num_groups=4,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=32,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=16,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(
            clip_sample=False, **{k: v for k, v in SD15_SCHEDULER_CONFIG.items() if k != "skip_prk_steps"}
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)
    return directory
