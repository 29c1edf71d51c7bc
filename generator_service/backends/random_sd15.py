"""Stable Diffusion v1.5's architecture with random weights ("random:sd15"), built offline.

The component configs below are those SD v1.5 ships with (UNet 860M, VAE 84M, CLIP ViT-L/14 text
encoder 123M parameters). Weights are drawn on the CPU under a fixed seed, so "random:sd15" always
means the same network; the generator fingerprint marks it random. The tokenizer is a byte-level
CLIP BPE tokenizer built from a small vocabulary and merge list written here (every byte is a
token, plus merges for a few common words), so it needs no download; its ids stay below the
text encoder's vocabulary size.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
    center_input_sample=False,
)
SD15_VAE_CONFIG = dict(
    sample_size=512,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    scaling_factor=0.18215,
)
SD15_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
)
# SD v1.5 ships a PNDM scheduler with these settings; the backend swaps it by name.
SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
)
RANDOM_SEED = 0
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_COMMON_WORDS = (
    "a an the of with on in and photo picture image background red green blue yellow orange "
    "purple pink cyan white black dark light circle square triangle star cross hexagon stripes dots"
).split()


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for bytes 0..255 (GPT-2 / CLIP convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def clip_vocab_and_merges(words: tuple[str, ...] | list[str] = _COMMON_WORDS) -> tuple[dict[str, int], list[str]]:
    """A small CLIP BPE vocabulary: each byte alone and word-final, a left-to-right merge chain per word, specials."""
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merge = f"{current} {piece}"
            current = current + piece
            if merge not in merges:
                merges.append(merge)
                if current not in tokens:
                    tokens.append(current)
    tokens += [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_clip_tokenizer_files(directory: str | Path, model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json of the small CLIP tokenizer to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": model_max_length,
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": EOS,
                "pad_token": EOS,
                "tokenizer_class": "CLIPTokenizer",
            }
        )
    )
    return directory


def build_clip_tokenizer(model_max_length: int = 77):
    """The small offline CLIP tokenizer (transformers.CLIPTokenizer)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_clip_tokenizer_files(folder, model_max_length)
        return CLIPTokenizer.from_pretrained(folder)


def build_random_sd15_pipeline(torch_dtype=None, seed: int = RANDOM_SEED):
    """A StableDiffusionPipeline with SD v1.5's architecture and seeded random weights (CPU, fp32 init)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_clip_tokenizer()
    text_config = CLIPTextConfig(
        **SD15_TEXT_CONFIG,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        text_encoder = CLIPTextModel(text_config)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if torch_dtype is not None and torch_dtype != torch.float32:
        pipe.to(dtype=torch_dtype)
    return pipe
