"""Whether ``torch.compile`` (its default inductor backend) can build kernels on this machine.

Inductor fails only at the first call of a compiled module, deep inside a generation or a step.
Checking its two prerequisites up front turns that into a clear message: a C/C++ compiler on
``PATH`` (or named by ``$CXX``/``$CC``) for host code, and the ``triton`` package for CUDA kernels.
"""
from __future__ import annotations

import importlib.util
import os
import shutil

HOST_COMPILERS = ("g++", "c++", "clang++", "gcc", "cc", "clang")


def host_compiler() -> str | None:
    """Path of the C/C++ compiler inductor would use (``$CXX``, ``$CC``, then common names), or None."""
    for candidate in (os.environ.get("CXX"), os.environ.get("CC"), *HOST_COMPILERS):
        if candidate:
            found = shutil.which(candidate)
            if found:
                return found
    return None


def compile_unavailable(device_type: str) -> str | None:
    """Why ``torch.compile`` cannot work for ``device_type`` (``cuda`` | ``cpu`` | ...) here, or None."""
    if host_compiler() is None:
        return (f"torch.compile needs a C/C++ compiler ({', '.join(HOST_COMPILERS[:3])} or $CXX) on PATH; "
                f"none found in PATH={os.environ.get('PATH', '')!r}")
    if device_type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs the triton package (the one matching this torch build)"
    return None
