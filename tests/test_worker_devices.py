"""Generator workers on GPU slots: one batch shape for compiled models (padding), no CUDA context for host-only backends."""
from __future__ import annotations

import numpy as np
import pytest

from generator_service.backends import create_backend
from generator_service.backends.compile_support import compile_unavailable
from generator_service.config import GeneratorConfig
from generator_service.worker import generate_task


def procedural(static_batch: bool):
    backend = create_backend(GeneratorConfig(backend="procedural", height=16, width=16, save_size=16,
                                             images_per_group=2))
    backend.static_batch = static_batch  # as a compiled diffusers backend declares itself
    sizes: list[int] = []
    real_generate = backend.generate

    def generate(captions, seeds):
        sizes.append(len(captions))
        return real_generate(captions, seeds)

    backend.generate = generate
    return backend, sizes


def test_short_last_batch_is_padded_for_a_static_batch_backend_and_the_padding_dropped():
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "red"]
    items = [(f"g{i}", f"a {c} circle with stripes on a dark background", [10 * i, 10 * i + 1])
             for i, c in enumerate(colours)]
    emitted: list = []
    backend, sizes = procedural(static_batch=True)
    generate_task(backend, items, 4, emitted.extend)
    assert sizes == [4, 4]  # 4 + 3 real captions, the second batch padded to 4
    assert [g for g, _, _ in emitted] == [f"g{i}" for i in range(7)]
    plain, plain_sizes = procedural(static_batch=False)
    alone: list = []
    generate_task(plain, items, 4, alone.extend)
    assert plain_sizes == [4, 3]
    for (_, padded_images, _), (_, images, _) in zip(emitted, alone):
        np.testing.assert_array_equal(padded_images, images)  # the padding changed no real group


@pytest.mark.skipif(compile_unavailable("cpu") is not None, reason="torch.compile needs a C compiler here")
def test_a_compiled_diffusers_backend_declares_a_static_batch(tiny_sd_path):
    fields = dict(backend="diffusers", model=str(tiny_sd_path), steps=2, height=32, width=32, save_size=32,
                  dtype="fp32", images_per_group=2)
    assert create_backend(GeneratorConfig(**fields, compile=True)).static_batch  # nothing compiles until a call
    assert not create_backend(GeneratorConfig(**fields)).static_batch


def test_a_procedural_worker_on_a_gpu_slot_opens_no_cuda_context():
    """`--gpus auto` gives every worker a GPU slot; the procedural backend renders on the host and must
    not call into CUDA (each worker would hold a context of ~0.5 GiB). Here, without a GPU, any CUDA
    call would raise."""
    import torch

    from generator_service.worker import WorkerSpec, _setup_device

    config = GeneratorConfig(backend="procedural", height=16, width=16, save_size=16, images_per_group=2)
    threads = torch.get_num_threads()
    try:
        _setup_device(WorkerSpec(index=0, device="cuda:0", config=config, worker_batch=2, num_threads=threads))
    finally:
        torch.set_num_threads(threads)
    if not torch.cuda.is_available():
        assert not torch.cuda.is_initialized()
