"""The diffusers backend on a tiny random-weight pipeline saved to disk (tests/tiny_sd.py)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from generator_service.backends import create_backend
from generator_service.backends.diffusers_backend import swap_scheduler
from generator_service.config import GeneratorConfig

CAPTIONS = ["a red circle on a beach", "two small dogs"]
SEEDS = [[11, 12, 13], [21, 22, 23]]


def tiny_config(path, **changes) -> GeneratorConfig:
    fields = dict(backend="diffusers", model=str(path), steps=2, height=32, width=32, save_size=32, dtype="fp32",
                  images_per_group=3)
    return GeneratorConfig(**{**fields, **changes})


@pytest.fixture(scope="module")
def reference_pipe(tiny_sd_path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(tiny_sd_path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ddim_images(tiny_sd_path):
    return create_backend(tiny_config(tiny_sd_path)).generate(CAPTIONS, SEEDS)


def direct(pipe, caption, seed, steps=2, guidance=2.0, size=32):
    """One image from a plain pipeline call with its own generator, as uint8 [H, W, 3]."""
    image = pipe(caption, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=steps,
                 guidance_scale=guidance, eta=0.0, height=size, width=size, output_type="np").images[0]
    return np.rint(image * 255).astype(np.uint8)


def max_difference(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_shape_dtype_and_safety_checker_off(tiny_sd_path, ddim_images):
    assert ddim_images.shape == (2, 3, 32, 32, 3) and ddim_images.dtype == np.uint8
    backend = create_backend(tiny_config(tiny_sd_path))
    assert getattr(backend.pipe, "safety_checker", None) is None
    assert type(backend.pipe.scheduler).__name__ == "DDIMScheduler"
    assert ddim_images.std() > 5  # real pictures, not a constant


def test_batched_images_equal_direct_pipeline_calls(reference_pipe, ddim_images):
    for i, caption in enumerate(CAPTIONS):
        for j, seed in enumerate(SEEDS[i]):
            assert max_difference(ddim_images[i, j], direct(reference_pipe, caption, seed)) <= 1


def test_each_image_depends_only_on_its_caption_and_seed(tiny_sd_path, ddim_images):
    backend = create_backend(tiny_config(tiny_sd_path))
    alone = backend.generate([CAPTIONS[1]], [[SEEDS[1][2], SEEDS[1][0]]])[0]
    assert max_difference(alone[0], ddim_images[1, 2]) <= 1
    assert max_difference(alone[1], ddim_images[1, 0]) <= 1
    assert max_difference(ddim_images[0, 0], ddim_images[0, 1]) > 10


def test_resize_happens_before_leaving_the_device(tiny_sd_path, ddim_images):
    small = create_backend(tiny_config(tiny_sd_path, save_size=16)).generate(CAPTIONS, SEEDS)
    assert small.shape == (2, 3, 16, 16, 3) and small.dtype == np.uint8
    # Antialiased downscale: close to 2x2 box averages of the full-size image.
    box = ddim_images.reshape(2, 3, 16, 2, 16, 2, 3).astype(float).mean(axis=(3, 5))
    assert np.abs(small - box).mean() < 12


def test_scheduler_swap_by_name(tiny_sd_path, ddim_images, reference_pipe):
    backend = create_backend(tiny_config(tiny_sd_path, scheduler="dpm++"))
    scheduler = backend.pipe.scheduler
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert scheduler.config.algorithm_type == "dpmsolver++"
    assert scheduler.config.beta_schedule == reference_pipe.scheduler.config.beta_schedule  # config carried over
    images = backend.generate(CAPTIONS, SEEDS)
    assert np.abs(images.astype(int) - ddim_images).mean() > 1


def test_ancestral_scheduler_is_reproducible_from_seeds(tiny_sd_path):
    backend = create_backend(tiny_config(tiny_sd_path, scheduler="euler-a", images_per_group=2))
    first = backend.generate(CAPTIONS, [[1, 2], [3, 4]])
    again = backend.generate([CAPTIONS[1]], [[4]])
    assert max_difference(first[1, 1], again[0, 0]) <= 1


def test_unknown_scheduler_is_named(tiny_sd_path, reference_pipe):
    with pytest.raises(ValueError, match="scheduler='ddim2'.*unknown scheduler; known: default, ddim, dpm\\+\\+"):
        tiny_config(tiny_sd_path, scheduler="ddim2")
    with pytest.raises(ValueError, match="unknown scheduler 'ddim2'"):
        swap_scheduler(reference_pipe, "ddim2")


@pytest.mark.parametrize("model", ["/no/such/pipeline", "./missing-pipeline", "missing/nested/pipeline"])
def test_missing_model_path_is_named(model):
    with pytest.raises(FileNotFoundError, match=f"diffusers model '{model}' not found"):
        create_backend(GeneratorConfig(backend="diffusers", model=model, dtype="fp32"))


def test_folder_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline: it has no model_index.json"):
        create_backend(GeneratorConfig(backend="diffusers", model=str(tmp_path), dtype="fp32"))


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_without_the_package_is_a_clear_error(tiny_sd_path):
    with pytest.raises(ValueError, match="attention='xformers' needs the xformers package"):
        create_backend(tiny_config(tiny_sd_path, attention="xformers"))


def test_random_sd15_has_the_real_architecture():
    """The SD v1.5 component configs, built on the meta device: exactly SD v1.5's parameter counts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from generator_service.backends.random_sd15 import (SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG,
                                                        build_clip_tokenizer)

    with torch.device("meta"):
        counts = [sum(p.numel() for p in module.parameters()) for module in (
            UNet2DConditionModel(**SD15_UNET_CONFIG), AutoencoderKL(**SD15_VAE_CONFIG),
            CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG)))]
    assert counts == [859_520_964, 83_653_863, 123_060_480]
    tokenizer = build_clip_tokenizer()
    ids = tokenizer("a red triangle with stripes", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and max(ids) < SD15_TEXT_CONFIG["vocab_size"]
    assert tokenizer.convert_ids_to_tokens(ids[1:3]) == ["a</w>", "red</w>"]


RUN_SLOW = os.environ.get("STABLEREP_RUN_SLOW") == "1"


@pytest.mark.slow
@pytest.mark.skipif(not RUN_SLOW, reason="builds the full SD v1.5 architecture (set STABLEREP_RUN_SLOW=1)")
def test_random_sd15_generates():
    config = GeneratorConfig(backend="diffusers", model="random:sd15", steps=1, height=64, width=64, save_size=32,
                             dtype="fp32", images_per_group=2)
    images = create_backend(config).generate(["a red circle"], [[1, 2]])
    assert images.shape == (1, 2, 32, 32, 3) and images.std() > 1


@pytest.mark.slow
@pytest.mark.skipif(not RUN_SLOW, reason="torch.compile is slow on a CPU (set STABLEREP_RUN_SLOW=1)")
def test_compiled_backend_matches_eager(tiny_sd_path, ddim_images):
    images = create_backend(tiny_config(tiny_sd_path, compile=True)).generate(CAPTIONS, SEEDS)
    assert max_difference(images, ddim_images) <= 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_matches_cpu_closely(tiny_sd_path, ddim_images):
    images = create_backend(tiny_config(tiny_sd_path, dtype="fp16"), device="cuda").generate(CAPTIONS, SEEDS)
    assert images.shape == ddim_images.shape
    assert np.abs(images.astype(int) - ddim_images).mean() < 4  # same CPU-generator noise, fp16 rounding only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_submit_three_batches_equals_generate_bitwise(tiny_sd_path):
    """The finisher's own CUDA stream, event and pinned copy hand back exactly what generate() makes."""
    backend = create_backend(tiny_config(tiny_sd_path, dtype="fp16"), device="cuda")
    batches = [(CAPTIONS, SEEDS), (["a blue square"], [[31, 32, 33]]), (CAPTIONS[::-1], [[41, 42, 43], [51, 52, 53]])]
    finished, failures = [], []
    for captions, seeds in batches:  # three in flight back to back: decode k overlaps denoise k+1
        backend.submit(captions, seeds, finished.append, failures.append)
    backend.drain()
    assert failures == [] and len(finished) == 3
    for (captions, seeds), images in zip(batches, finished):
        np.testing.assert_array_equal(images, backend.generate(captions, seeds))
    backend.close()
