"""torch.compile prerequisites are checked up front, with a message that says what is missing."""
from __future__ import annotations

import shutil

import pytest

from generator_service.backends import create_backend
from generator_service.backends.compile_support import compile_unavailable, host_compiler
from generator_service.config import GeneratorConfig


@pytest.fixture
def no_compiler_on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no compiler can be found
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CC", raising=False)
    return tmp_path


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None, reason="needs a C compiler")
def test_compiler_found_on_this_machine():
    assert host_compiler() is not None
    assert compile_unavailable("cpu") is None


def test_missing_compiler_is_named(no_compiler_on_path):
    assert host_compiler() is None
    reason = compile_unavailable("cpu")
    assert reason is not None and "C/C++ compiler" in reason and str(no_compiler_on_path) in reason


def test_cxx_variable_is_honoured(no_compiler_on_path, monkeypatch):
    real = shutil.which("cc", path="/usr/bin:/bin") or shutil.which("gcc", path="/usr/bin:/bin")
    if real is None:
        pytest.skip("needs a C compiler in /usr/bin or /bin")
    monkeypatch.setenv("CXX", real)
    assert host_compiler() == real


def test_diffusers_backend_refuses_compile_before_loading(tiny_sd_path, no_compiler_on_path):
    config = GeneratorConfig(backend="diffusers", model=str(tiny_sd_path), steps=2, height=32, width=32,
                             save_size=32, images_per_group=1, dtype="fp32", compile=True)
    with pytest.raises(ValueError, match="compile=True on cpu: torch.compile needs a C/C.. compiler"):
        create_backend(config, "cpu")
