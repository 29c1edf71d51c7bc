"""Backend facts: each backend's config defaults and needs come from its own registry entry."""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest

from generator_service.backends import BACKENDS, backend_facts, create_backend, register_backend
from generator_service.backends.base import Backend
from generator_service.backends.facts import DEFAULT_FIELDS, BackendFacts
from generator_service.config import GeneratorConfig


class Flat(Backend):
    """Every pixel 9: a backend that is not a diffusion model."""

    facts = BackendFacts(model="flat-v1", height=24, width=24, save_size=24, images_per_group=3,
                         ignored_fields=("steps",))

    def _generate(self, captions, seeds):
        size = self.config.save_size
        return np.full((len(captions), len(seeds[0]), size, size, 3), 9, np.uint8)


@pytest.fixture
def flat():
    register_backend("flat-test", Flat)
    yield "flat-test"
    BACKENDS.unregister("flat-test")


def test_a_new_backend_takes_its_own_defaults_not_diffusers(flat):
    config = GeneratorConfig(backend=flat)
    assert (config.model, config.height, config.width, config.save_size, config.images_per_group) == (
        "flat-v1", 24, 24, 24, 3)
    assert (config.scheduler, config.steps, config.dtype, config.recipe, config.lora, config.vae) == (
        "none", 0, "fp32", "none", "none", "default")
    assert config.welcome_info().extra is None
    payload = {"backend": flat, "height": 24, "width": 24, "save_size": 24, "model": "flat-v1"}
    assert config.fingerprint() == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    assert create_backend(config).generate(["x"], [[1, 2, 3]]).shape == (1, 3, 24, 24, 3)


def test_ignored_fields_are_named_in_a_warning(flat):
    with pytest.warns(UserWarning, match=r"GeneratorConfig.steps=7 does not apply to the flat-test backend"):
        config = GeneratorConfig(backend=flat, steps=7)
    assert config.steps == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GeneratorConfig(backend=flat, steps=0)  # its own value: no warning


def test_a_backend_without_facts_is_refused_by_name():
    class Bare(Backend):
        def _generate(self, captions, seeds):
            raise AssertionError("never built")

    with pytest.raises(ValueError, match=r"generator backend 'bare-test' \(.*Bare\) declares no BackendFacts"):
        register_backend("bare-test", Bare)
    assert "bare-test" not in BACKENDS
    BACKENDS.register("bare-test", Bare)  # registered past the check (e.g. straight into the registry)
    try:
        with pytest.raises(ValueError, match="generator backend 'bare-test' .* declares no BackendFacts"):
            GeneratorConfig(backend="bare-test")
    finally:
        BACKENDS.unregister("bare-test")


def test_facts_naming_an_unknown_field_are_refused_by_backend():
    class Typo(Flat):
        facts = BackendFacts(model="typo-v1", height=8, width=8, save_size=8, pixel_fields=("backend", "hieght"))

    register_backend("typo-test", Typo)
    try:
        with pytest.raises(ValueError, match=r"generator backend 'typo-test': .* unknown GeneratorConfig field\(s\): hieght"):
            GeneratorConfig(backend="typo-test")
    finally:
        BACKENDS.unregister("typo-test")


def test_built_in_facts_cover_every_default_field():
    diffusers, procedural = backend_facts("diffusers"), backend_facts("procedural")
    assert set(diffusers.defaults()) == set(DEFAULT_FIELDS) == set(procedural.defaults())
    assert GeneratorConfig(backend="diffusers").to_dict() | {"attention": None, "compile": None, "backend": None} == (
        diffusers.defaults() | {"attention": None, "compile": None, "backend": None})
    assert procedural.host_only and not diffusers.host_only
    assert diffusers.loads_diffusers_pipeline and diffusers.uses_recipes and not procedural.uses_recipes


def test_cli_backend_choices_are_the_registry_names(flat, tmp_path):
    from generator_service.cli_arguments import parse_args

    assert parse_args(["--backend", flat]).backend == flat
    with pytest.raises(SystemExit):
        parse_args(["--backend", "nope"])
