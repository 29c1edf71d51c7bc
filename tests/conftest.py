"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    """Folder of a tiny random-weight StableDiffusionPipeline saved with save_pretrained (tests/tiny_sd.py)."""
    from tests.tiny_sd import make_tiny_sd_pipeline

    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_lora_path(tmp_path_factory, tiny_sd_path):
    """Folder of a random peft LoRA adapter for the tiny pipeline (tests/tiny_sd.py)."""
    from tests.tiny_sd import make_tiny_lora

    return make_tiny_lora(tmp_path_factory.mktemp("tiny_lora"), tiny_sd_path)


@pytest.fixture(scope="session")
def tiny_taesd_path(tmp_path_factory):
    """Folder of a random AutoencoderTiny matching the tiny pipeline's latents (tests/tiny_sd.py)."""
    from tests.tiny_sd import make_tiny_taesd

    return make_tiny_taesd(tmp_path_factory.mktemp("tiny_taesd"))
