"""GeneratorConfig (defaults, JSON round trip, validation, fingerprint) and the per-image seed rule."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from protocol import GeneratorInfo, Welcome, decode, encode
from generator_service.config import GeneratorConfig
from generator_service.seeds import image_seed

PAPER = GeneratorConfig(backend="diffusers")


def test_diffusers_defaults_reproduce_the_paper():
    assert PAPER.model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (PAPER.scheduler, PAPER.steps, PAPER.eta, PAPER.guidance) == ("ddim", 50, 0.0, 2.0)
    assert (PAPER.height, PAPER.width, PAPER.save_size) == (512, 512, 256)
    assert (PAPER.images_per_group, PAPER.dtype, PAPER.attention, PAPER.compile) == (10, "fp16", "sdpa", False)


def test_procedural_is_the_default_backend_with_small_images():
    config = GeneratorConfig()
    assert config.backend == "procedural" and config.model == "procedural-v1"
    assert (config.height, config.width, config.save_size, config.images_per_group) == (64, 64, 64, 10)
    assert (config.scheduler, config.steps) == ("none", 0)


def test_procedural_warns_about_settings_that_do_not_apply():
    with pytest.warns(UserWarning, match="scheduler"):
        config = GeneratorConfig(backend="procedural", scheduler="euler")
    assert config.scheduler == "none"


@pytest.mark.parametrize(
    "config",
    [GeneratorConfig(), PAPER, GeneratorConfig(backend="diffusers", model="random:sd15", scheduler="dpm++", steps=20,
                                               guidance=1.5, height=256, width=384, save_size=128, dtype="bf16")],
)
def test_json_round_trip(config):
    assert GeneratorConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert None not in config.to_dict().values()


def test_from_dict_fills_missing_fields_with_backend_defaults():
    assert GeneratorConfig.from_dict({"backend": "diffusers", "steps": 20}) == PAPER.replace(steps=20)


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match=r"unknown GeneratorConfig field\(s\): stepz; known fields: backend"):
        GeneratorConfig.from_dict({"backend": "diffusers", "stepz": 3})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, "must be >= 1"),
        ("steps", "50", "must be an integer"),
        ("steps", 12.0, "must be an integer"),
        ("guidance", -1.0, r"must be in \[0.0"),
        ("eta", 1.5, r"must be in \[0.0, 1.0\]"),
        ("height", 500, "multiple of 8"),
        ("save_size", 0, "must be >= 8"),
        ("images_per_group", 0, "must be >= 1"),
        ("dtype", "fp8", "must be one of fp16, bf16, fp32"),
        ("attention", "flash", "must be one of sdpa, xformers"),
        ("scheduler", "nope", "unknown scheduler; known: default, ddim"),
        ("model", "random:sdxl", "unknown random-weight model"),
        ("model", "", "must be a non-empty string"),
        ("compile", "yes", "must be true or false"),
    ],
)
def test_bad_values_name_field_and_value(field, value, message):
    with pytest.raises(ValueError, match=rf"GeneratorConfig\.{field}={value!r}.*{message}".replace("(", r"\(")):
        GeneratorConfig(backend="diffusers", **{field: value})


def test_procedural_rejects_unknown_model():
    with pytest.raises(ValueError, match="only knows model 'procedural-v1'"):
        GeneratorConfig(backend="procedural", model="procedural-v9")


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PAPER.steps = 3


@pytest.mark.parametrize(
    "change",
    [dict(scheduler="dpm++"), dict(steps=20), dict(guidance=3.0), dict(eta=0.5), dict(height=256), dict(width=256),
     dict(save_size=128), dict(dtype="fp32"), dict(model="someone/other-model"), dict(model="random:sd15")],
)
def test_fingerprint_changes_with_pixel_fields(change):
    assert PAPER.replace(**change).fingerprint() != PAPER.fingerprint()


@pytest.mark.parametrize("change", [dict(images_per_group=6), dict(attention="xformers"), dict(compile=True)])
def test_fingerprint_ignores_fields_that_do_not_change_pixels(change):
    assert PAPER.replace(**change).fingerprint() == PAPER.fingerprint()


def test_fingerprint_is_stable_and_short():
    # The documented composition: a change here changes every stored fingerprint (shards, manifests).
    config = GeneratorConfig()
    payload = {"backend": "procedural", "height": 64, "width": 64, "save_size": 64, "model": "procedural-v1"}
    assert config.fingerprint() == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    assert config.fingerprint() == GeneratorConfig().fingerprint()
    assert config.replace(save_size=32).fingerprint() != config.fingerprint()
    assert config.replace(images_per_group=4).fingerprint() == config.fingerprint()


def test_random_weights_are_marked():
    config = GeneratorConfig(backend="diffusers", model="random:sd15")
    assert config.is_random_weights and not PAPER.is_random_weights
    assert config.fingerprint().endswith("-random-sd15")
    assert "random" not in PAPER.fingerprint()
    info = config.welcome_info()
    assert info.model == "random:sd15" and info.fingerprint == config.fingerprint()


def test_welcome_info_is_the_protocol_generator_description():
    info = PAPER.welcome_info()
    assert isinstance(info, GeneratorInfo)
    assert set(info.to_wire()) == {"backend", "model", "scheduler", "steps", "guidance", "height", "width",
                                   "save_size", "images_per_group", "fingerprint"}
    assert (info.backend, info.scheduler, info.steps, info.guidance) == ("diffusers", "ddim", 50, 2.0)
    assert (info.save_size, info.images_per_group) == (256, 10)
    # it survives the wire unchanged
    assert decode(encode(Welcome("svc", info, 1000))).generator == info


def _fake_pipeline(folder, weights: bytes):
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (folder / "unet").mkdir()
    (folder / "unet" / "config.json").write_text('{"sample_size": 8}')
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    return str(folder)


def test_local_model_identity_follows_content_not_path(tmp_path):
    a = _fake_pipeline(tmp_path / "a", b"\x01" * 1000)
    b = _fake_pipeline(tmp_path / "b", b"\x01" * 1000)
    c = _fake_pipeline(tmp_path / "c", b"\x02" * 1000)
    fingerprint = lambda model: PAPER.replace(model=model).fingerprint()  # noqa: E731
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(c)


def test_image_seed_follows_the_documented_rule():
    message = b"stablerep/image_seed/v1:7:123:4"
    expected = int.from_bytes(hashlib.blake2b(message, digest_size=8).digest(), "little") >> 1
    assert image_seed(7, 123, 4) == expected


def test_image_seeds_are_63_bit_distinct_and_deterministic():
    seeds = [image_seed(base, caption, index) for base in range(3) for caption in range(50) for index in range(10)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert max(seeds) > 2**60  # uses the whole range
    assert image_seed(3, 9, 2) == image_seed(3, 9, 2)  # deterministic


@pytest.mark.parametrize("args", [(-1, 0, 0), (0, -5, 0), (0, 0, -1)])
def test_image_seed_rejects_negative(args):
    with pytest.raises(ValueError, match="must be >= 0"):
        image_seed(*args)


def test_image_seed_rejects_non_int():
    with pytest.raises(TypeError, match="caption_id must be an int"):
        image_seed(0, 1.5, 0)


def test_procedural_sizes_follow_each_other():
    assert (GeneratorConfig(save_size=32).height, GeneratorConfig(save_size=32).width) == (32, 32)
    assert GeneratorConfig(height=48, width=48).save_size == 48
    assert GeneratorConfig(height=96, width=96, save_size=32).save_size == 32
    assert PAPER.replace(save_size=128).height == 512  # diffusers sizes stay independent
