"""Fast generation: every recipe, LoRA and tiny decoder by path, our own loop vs the plain pipeline call.

The tiny pipeline of tests/tiny_sd.py stands in for SD v1.5; recipes that name hub weights get
tiny local ones instead (a random peft LoRA for lcm4, the tiny pipeline for turbo, a random
AutoencoderTiny for turbo-tiny), so nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from generator_service.backends import create_backend
from generator_service.backends.uint8_images import to_uint8_hwc
from generator_service.config import GeneratorConfig
from generator_service.recipes import RECIPE_NAMES

CAPTIONS = ["a red circle on a beach", "two small dogs", "a red circle on a beach"]  # one repeated
SEEDS = [[11, 12], [21, 22], [31, 32]]
STEPS = {"paper": 3, "dpm20": 3}  # fewer than the recipe's steps: the tiny model needs no more


def recipe_config(name, tiny_sd_path, tiny_lora_path, tiny_taesd_path, **changes) -> GeneratorConfig:
    fields = dict(backend="diffusers", recipe=name, model=str(tiny_sd_path), height=32, width=32, save_size=32,
                  dtype="fp32", images_per_group=2)
    if name in STEPS:
        fields["steps"] = STEPS[name]
    if name == "lcm4":
        fields["lora"] = str(tiny_lora_path)
    if name == "turbo-tiny":
        fields["vae"] = f"tiny:{tiny_taesd_path}"
    return GeneratorConfig(**{**fields, **changes})


def plain_call(backend, captions, seeds) -> np.ndarray:
    """The same pipeline, called as it is (``pipe(prompt=..., generator=[...])``), to uint8 [B, m, S, S, 3]."""
    with torch.inference_mode():
        images = backend.pipe(**backend.pipeline_kwargs(captions, seeds)).images
        images = to_uint8_hwc(images, backend.config.save_size, torch.device("cpu")).numpy()
    size = backend.config.save_size
    return images.reshape(len(captions), len(seeds[0]), size, size, 3)


@pytest.fixture
def paths(tiny_sd_path, tiny_lora_path, tiny_taesd_path):
    return tiny_sd_path, tiny_lora_path, tiny_taesd_path


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_overlapped_loop_equals_the_plain_pipeline_bitwise(name, paths):
    backend = create_backend(recipe_config(name, *paths))
    assert backend.loop is not None
    finished = []
    failures = []
    # Two batches: the first is decoded in the finisher while the second is denoised.
    backend.submit(CAPTIONS[:2], SEEDS[:2], finished.append, failures.append)
    backend.submit(CAPTIONS[2:], SEEDS[2:], finished.append, failures.append)
    backend.drain()
    assert not failures
    overlapped = np.concatenate(finished)
    plain = np.concatenate([plain_call(backend, CAPTIONS[:2], SEEDS[:2]), plain_call(backend, CAPTIONS[2:], SEEDS[2:])])
    assert overlapped.shape == (3, 2, 32, 32, 3) and overlapped.std() > 5
    assert np.array_equal(overlapped, plain)
    # One synchronous batch with a repeated caption (encoded once) is the plain call of that batch, too.
    assert np.array_equal(backend.generate(CAPTIONS, SEEDS), plain_call(backend, CAPTIONS, SEEDS))
    backend.close()


def _count_rows(module):
    rows = []
    handle = module.register_forward_pre_hook(lambda mod, args, kwargs: rows.append(
        (kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[0]), with_kwargs=True)
    return rows, handle


def test_no_unconditional_batch_without_guidance_and_captions_encoded_once(paths):
    for guidance, unet_rows, text_rows in [(1.0, 6, [2]), (2.0, 12, [2, 1])]:
        backend = create_backend(recipe_config("paper", *paths, guidance=guidance))
        unet_seen, unet_hook = _count_rows(backend.pipe.unet)
        text_seen, text_hook = _count_rows(backend.pipe.text_encoder)
        backend.generate(CAPTIONS, SEEDS)
        unet_hook.remove()
        text_hook.remove()
        # 3 captions x 2 images; CFG doubles the UNet batch only when guidance > 1.
        assert set(unet_seen) == {unet_rows}
        # Two distinct captions, and the empty caption once (the plain call encodes 3 + 3).
        assert text_seen == text_rows
        backend.close()


def test_random_lora_by_path_changes_images_like_diffusers_fused_lora(paths):
    tiny_sd_path, tiny_lora_path, _ = paths
    from diffusers import DiffusionPipeline

    base = create_backend(recipe_config("paper", *paths)).generate(CAPTIONS[:2], SEEDS[:2])
    adapted = create_backend(recipe_config("paper", *paths, lora=str(tiny_lora_path), lora_scale=0.8))
    images = adapted.generate(CAPTIONS[:2], SEEDS[:2])
    assert np.abs(images.astype(int) - base).mean() > 2  # the adapter is really in the weights
    assert not any("lora" in name for name, _ in adapted.pipe.unet.named_modules())  # fused and unloaded
    by_hand = DiffusionPipeline.from_pretrained(str(tiny_sd_path), safety_checker=None)
    by_hand.scheduler = adapted.pipe.scheduler
    by_hand.load_lora_weights(str(tiny_lora_path / "pytorch_lora_weights.safetensors"))
    by_hand.fuse_lora(lora_scale=0.8)
    adapted.pipe = by_hand
    adapted.loop.pipe = by_hand
    assert np.abs(adapted.generate(CAPTIONS[:2], SEEDS[:2]).astype(int) - images).max() <= 1


def test_tiny_vae_by_path_and_random(paths):
    tiny_sd_path, _, tiny_taesd_path = paths
    from diffusers import AutoencoderTiny

    base = create_backend(recipe_config("paper", *paths)).generate(CAPTIONS[:1], SEEDS[:1])
    backend = create_backend(recipe_config("paper", *paths, vae=f"tiny:{tiny_taesd_path}"))
    assert isinstance(backend.pipe.vae, AutoencoderTiny)
    images = backend.generate(CAPTIONS[:1], SEEDS[:1])
    assert images.shape == base.shape and np.abs(images.astype(int) - base).mean() > 2
    # TAESD's architecture upsamples 8x; the tiny pipeline's latents are 1/2 of the image side.
    with pytest.raises(ValueError, match="vae='tiny:random' upsamples latents 8x but the pipeline's latents are 1/2"):
        create_backend(recipe_config("paper", *paths, vae="tiny:random"))
    with pytest.raises(FileNotFoundError, match="tiny VAE '/no/such/taesd' not found"):
        create_backend(recipe_config("paper", *paths, vae="tiny:/no/such/taesd"))


def test_tiny_random_is_the_taesd_architecture():
    from generator_service.backends.adapters import decoder_scale_factor, tiny_vae

    class Pipe:  # only what the check reads: SD's 8x latent factor
        vae_scale_factor = 8

    vae = tiny_vae("tiny:random", Pipe(), torch.float32)
    assert sum(p.numel() for p in vae.parameters()) == 2_445_063 and decoder_scale_factor(vae) == 8
    again = tiny_vae("tiny:random", Pipe(), torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(vae.parameters(), again.parameters()))  # seeded


def test_missing_lora_is_named(paths):
    with pytest.raises(FileNotFoundError, match="LoRA adapter '/no/such/lora' not found"):
        create_backend(recipe_config("paper", *paths, lora="/no/such/lora"))


def _shard_images(out) -> dict[str, tuple[dict, np.ndarray]]:
    groups: dict[str, dict] = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, rest = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                entry = groups.setdefault(key, {"images": {}})
                if rest == "json":
                    entry["header"] = json.loads(data)
                elif rest.endswith(".png"):
                    entry["images"][int(rest.split(".")[0])] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return {k: (v["header"], np.stack([v["images"][j] for j in sorted(v["images"])])) for k, v in groups.items()}


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_every_recipe_runs_through_the_service(name, paths, tmp_path):
    from generator_service.cli import main

    tiny_sd_path, tiny_lora_path, tiny_taesd_path = paths
    config = recipe_config(name, *paths)
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\ntwo small dogs\na blue square\n")
    out = tmp_path / "shards"
    argv = ["--captions", str(captions), "--out", str(out), "--gpus", "cpu", "--backend", "diffusers",
            "--recipe", name, "--model", str(tiny_sd_path), "--height", "32", "--width", "32", "--save-size", "32",
            "--dtype", "fp32", "--images-per-group", "2", "--worker-batch", "2", "--no-progress"]
    if name in STEPS:
        argv += ["--steps", str(STEPS[name])]
    if name == "lcm4":
        argv += ["--lora", str(tiny_lora_path)]
    if name == "turbo-tiny":
        argv += ["--vae", f"tiny:{tiny_taesd_path}"]
    assert main(argv) == 0
    groups = _shard_images(out)
    assert len(groups) == 3
    backend = create_backend(config)
    for header, images in groups.values():
        assert header["generator"] == config.fingerprint()
        alone = backend.generate([header["caption"]], [header["seeds"]])[0]
        assert np.abs(images.astype(int) - alone).max() <= 1  # batched in the service, alone here


def test_finisher_hands_failures_to_the_failure_path_and_keeps_going():
    from generator_service.backends.denoise import Finisher

    def decode(latents):
        if latents.sum() < 0:
            raise ValueError("cannot decode negative latents")
        return (latents * 2).to(torch.uint8)

    finisher = Finisher(decode, torch.device("cpu"))
    done, failed = [], []
    finisher.submit(-torch.ones(2, 3), (2, 3), done.append, failed.append)
    finisher.submit(torch.ones(2, 3), (1, 2, 3), done.append, failed.append)
    finisher.close()
    assert [str(exc) for exc in failed] == ["cannot decode negative latents"]
    assert len(done) == 1 and done[0].shape == (1, 2, 3) and (done[0] == 2).all()


def test_out_of_memory_in_decode_halves_the_decode_slice_and_loses_nothing(paths, caplog):
    """The finisher's decode runs out of memory above 2 images (raised by the VAE, as CUDA would):
    the slice halves 8 -> 4 -> 2, the batch is finished, and later batches keep the smaller slice."""
    backend = create_backend(recipe_config("paper", *paths))
    captions, seeds = [*CAPTIONS, "a green tree"], [*SEEDS, [41, 42]]  # 8 images
    backend.loop.decode_slice = 2
    reference = backend.generate(captions, seeds)  # 8 images decoded 2 at a time, no fault
    backend.loop.decode_slice = 8
    vae = backend.pipe.vae
    real_decode, calls = vae.decode, []

    def decode_that_runs_out_above_two(latents, *args, **kwargs):
        calls.append(latents.shape[0])
        if latents.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real_decode(latents, *args, **kwargs)

    vae.decode = decode_that_runs_out_above_two
    finished, failures = [], []
    with caplog.at_level("WARNING"):
        backend.submit(captions, seeds, finished.append, failures.append)
        backend.submit(captions[:1], seeds[:1], finished.append, failures.append)
        backend.drain()
    assert failures == [] and len(finished) == 2
    assert np.array_equal(finished[0], reference)
    assert np.array_equal(finished[1], reference[:1])
    assert calls == [8, 4, 2, 2, 2, 2, 2] and backend.loop.decode_slice == 2  # 8 -> 4 -> 2, 4 x 2, then 2
    assert "decoding 2 at a time" in caplog.text
    backend.close()


def test_out_of_memory_decoding_one_image_fails_the_batch(paths):
    backend = create_backend(recipe_config("paper", *paths))

    def always_out_of_memory(latents, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    backend.pipe.vae.decode = always_out_of_memory
    finished, failures = [], []
    backend.submit(CAPTIONS[:1], SEEDS[:1], finished.append, failures.append)
    backend.drain()
    assert finished == [] and len(failures) == 1 and isinstance(failures[0], torch.cuda.OutOfMemoryError)
    assert backend.loop.decode_slice == 1
    backend.close()
