"""Named recipes, adapters and decoders in GeneratorConfig: precedence, validation, fingerprint."""

from __future__ import annotations

import json

import pytest

from generator_service.cli_arguments import build_parser, generator_config
from generator_service.config import GeneratorConfig
from generator_service.recipes import LCM_LORA_SD15, RECIPES, SD_TURBO, TAESD

PAPER = GeneratorConfig(backend="diffusers")


def test_paper_is_the_default_recipe_and_keeps_its_fingerprint():
    assert PAPER.recipe == "paper" and (PAPER.lora, PAPER.vae, PAPER.lora_scale) == ("none", "default", 1.0)
    assert GeneratorConfig(backend="diffusers", recipe="paper") == PAPER
    # Configs without recipe/adapter/decoder hash exactly the fields of earlier versions.
    import hashlib
    import json

    payload = {name: getattr(PAPER, name) for name in
               ("backend", "scheduler", "steps", "guidance", "eta", "height", "width", "save_size", "dtype")}
    payload["model"] = PAPER.model
    assert PAPER.fingerprint() == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_recipe_sets_its_fields(name):
    config = GeneratorConfig(backend="diffusers", recipe=name)
    for field, value in RECIPES[name].settings.items():
        assert getattr(config, field) == value, field
    assert GeneratorConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_recipe_values():
    lcm = GeneratorConfig(backend="diffusers", recipe="lcm4")
    assert (lcm.scheduler, lcm.steps, lcm.guidance, lcm.lora) == ("lcm", 4, 1.0, LCM_LORA_SD15)
    turbo = GeneratorConfig(backend="diffusers", recipe="turbo")
    assert (turbo.model, turbo.steps, turbo.guidance, turbo.scheduler) == (SD_TURBO, 1, 0.0, "euler-trailing")
    assert GeneratorConfig(backend="diffusers", recipe="turbo-tiny").vae == f"tiny:{TAESD}"
    dpm = GeneratorConfig(backend="diffusers", recipe="dpm20")
    assert (dpm.scheduler, dpm.steps, dpm.guidance) == ("dpm++", 20, 2.0)


def test_explicit_fields_override_the_recipe():
    config = GeneratorConfig(backend="diffusers", recipe="lcm4", steps=8, lora="none", model="random:sd15")
    assert (config.steps, config.lora, config.model, config.scheduler) == (8, "none", "random:sd15", "lcm")
    args = build_parser().parse_args(["--backend", "diffusers", "--recipe", "turbo", "--steps", "4", "--vae",
                                      "tiny:random", "--lora", "some/adapter", "--lora-scale", "0.5"])
    config = generator_config(args)
    assert (config.recipe, config.steps, config.guidance, config.vae) == ("turbo", 4, 0.0, "tiny:random")
    assert (config.lora, config.lora_scale) == ("some/adapter", 0.5)


def test_recipe_from_yaml_config(tmp_path):
    from generator_service.cli_arguments import parse_args

    path = tmp_path / "gen.yaml"
    path.write_text("backend: diffusers\nrecipe: dpm20\nguidance: 1.5\n")
    config = generator_config(parse_args(["--config", str(path)]))
    assert (config.recipe, config.scheduler, config.steps, config.guidance) == ("dpm20", "dpm++", 20, 1.5)


@pytest.mark.parametrize(
    "field, value, message",
    [("recipe", "fast", "unknown recipe; known: paper, dpm20, lcm4, turbo"),
     ("vae", "taesd", "must be 'default', 'tiny:PATH_OR_ID' or 'tiny:random'"),
     ("vae", "tiny:", "must be 'default'"),
     ("lora", "", "must be an adapter folder"),
     ("lora_scale", "1", "must be a number")],
)
def test_bad_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=rf"GeneratorConfig\.{field}={value!r}: {message}"):
        GeneratorConfig(backend="diffusers", **{field: value})


def test_procedural_ignores_recipes():
    with pytest.warns(UserWarning, match="recipe"):
        config = GeneratorConfig(backend="procedural", recipe="lcm4")
    assert config.recipe == "none" and config.fingerprint() == GeneratorConfig().fingerprint()


@pytest.mark.parametrize(
    "change",
    [dict(recipe="dpm20"), dict(recipe="lcm4", lora="none"), dict(lora="a/adapter"), dict(vae="tiny:random"),
     dict(vae="tiny:madebyollin/taesd")],
)
def test_fingerprint_changes_with_recipe_adapter_and_decoder(change):
    assert PAPER.replace(**change).fingerprint() != PAPER.fingerprint()


def test_fingerprint_follows_adapter_content_and_scale(tmp_path):
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    a.write_bytes(b"\x01" * 100)
    b.write_bytes(b"\x01" * 100)
    c.write_bytes(b"\x02" * 100)
    fingerprint = lambda **kw: PAPER.replace(**kw).fingerprint()  # noqa: E731
    assert fingerprint(lora=str(a)) == fingerprint(lora=str(b))  # same bytes, another path
    assert fingerprint(lora=str(a)) != fingerprint(lora=str(c))
    assert fingerprint(lora=str(a), lora_scale=0.5) != fingerprint(lora=str(a))
    assert fingerprint(lora_scale=0.5) == PAPER.fingerprint()  # no adapter: the scale changes nothing
    folder = tmp_path / "taesd"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "AutoencoderTiny"}')
    first = fingerprint(vae=f"tiny:{folder}")
    (folder / "config.json").write_text('{"_class_name": "AutoencoderTiny", "latent_channels": 4}')
    assert PAPER.replace(vae=f"tiny:{folder}").fingerprint() != first


def test_welcome_describes_recipe_adapter_and_decoder():
    assert PAPER.welcome_info().extra is None  # the paper's description is unchanged
    info = GeneratorConfig(backend="diffusers", recipe="lcm4", vae="tiny:random").welcome_info()
    assert info.extra == {"recipe": "lcm4", "lora": LCM_LORA_SD15, "lora_scale": 1.0, "vae": "tiny:random"}
    assert (info.scheduler, info.steps, info.guidance) == ("lcm", 4, 1.0)
    assert info.to_wire()["extra"]["recipe"] == "lcm4"
