"""Worker pool: device specs, out-of-memory halving, and a supervised run with a worker killed mid-run."""
from __future__ import annotations

import io
import json
import os
import signal
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from generator_service.captions import load_captions
from generator_service.config import GeneratorConfig
from generator_service.devices import DeviceSpecError, parse_devices
from generator_service.procedural import write_caption_file
from generator_service.service import ServiceOptions, run_service
from generator_service.shards import read_manifest
from generator_service.worker import GenerationFailed, generate_task


@pytest.mark.parametrize(
    "spec,cuda_count,expected",
    [
        ("0-3", 4, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),
        ("0,2", 4, ["cuda:0", "cuda:2"]),
        ("0-1,3", None, ["cuda:0", "cuda:1", "cuda:3"]),
        ("cuda:1", 2, ["cuda:1"]),
        ("cpu", None, ["cpu"]),
        ("cpu:2", None, ["cpu", "cpu"]),
        ("auto", 0, ["cpu"]),
        ("auto", 2, ["cuda:0", "cuda:1"]),
    ],
)
def test_parse_devices(spec, cuda_count, expected):
    assert parse_devices(spec, cuda_count) == expected


@pytest.mark.parametrize(
    "spec,cuda_count,message",
    [
        ("3-1", None, "runs backwards"),
        ("0,0", None, "listed twice"),
        ("gpu0", None, "not a GPU index"),
        ("cpu:0", None, "cpu:N"),
        ("", None, "empty"),
        ("0-3", 2, "GPU 2 does not exist"),
        ("0", 0, "no CUDA device"),
    ],
)
def test_parse_devices_errors(spec, cuda_count, message):
    with pytest.raises(DeviceSpecError, match=message) as info:
        parse_devices(spec, cuda_count)
    assert "--gpus" in str(info.value)


class RunsOutOfMemoryAbove:
    """A generate() that fails like a GPU that fits at most ``fits`` captions per batch."""

    def __init__(self, fits: int) -> None:
        self.fits = fits
        self.batch_sizes: list[int] = []

    def __call__(self, captions, seeds):
        self.batch_sizes.append(len(captions))
        if len(captions) > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return np.stack([np.full((len(s), 4, 4, 3), int(c), np.uint8) for c, s in zip(captions, seeds)])


def test_out_of_memory_halves_batch_and_loses_nothing(caplog):
    items = [(f"g{i}", str(i), [i, i + 1]) for i in range(8)]
    emitted, limits = [], []
    generate = RunsOutOfMemoryAbove(fits=2)
    with caplog.at_level("WARNING"):
        final = generate_task(generate, items, 8, emitted.extend, limits.append)
    assert final == 2 and limits == [4, 2]
    assert [g for g, _, _ in emitted] == [f"g{i}" for i in range(8)]
    assert all(int(images[0, 0, 0, 0]) == int(g[1:]) for g, images, _ in emitted)
    assert generate.batch_sizes == [8, 4, 2, 2, 2, 2]
    assert sum("out of memory" in r.getMessage() for r in caplog.records) == 2


def test_out_of_memory_at_one_caption_fails_naming_the_group():
    with pytest.raises(GenerationFailed) as info:
        generate_task(RunsOutOfMemoryAbove(fits=0), [("only", "0", [1])], 4, lambda g: None)
    assert info.value.group_ids == ["only"]


def _direct_diffusers(model_path, caption, seeds, config):
    from diffusers import DiffusionPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the pool's workers on this 2-core machine; also immune to CPU contention
    try:
        return _call_pipeline(DiffusionPipeline, model_path, caption, seeds, config)
    finally:
        torch.set_num_threads(threads)


def _call_pipeline(DiffusionPipeline, model_path, caption, seeds, config):
    pipe = DiffusionPipeline.from_pretrained(str(model_path), torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=[caption],
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        num_inference_steps=config.steps,
        guidance_scale=config.guidance,
        height=config.height,
        width=config.width,
        output_type="np",
    ).images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def test_offline_run_survives_kill_9_of_a_worker_exactly_once(tmp_path, tiny_sd_path):
    captions_file = write_caption_file(tmp_path / "captions.txt", 16)
    config = GeneratorConfig(
        backend="diffusers", model=str(tiny_sd_path), steps=2, height=32, width=32, save_size=32,
        images_per_group=2, dtype="fp32",
    )
    out = tmp_path / "shards"
    killed: list[int] = []

    def kill_a_busy_worker(pool, server):
        if killed or pool.groups_delivered < 2:
            return
        for worker in pool.workers:
            if worker.alive and worker.in_flight:
                os.kill(worker.pid, signal.SIGKILL)
                killed.append(worker.pid)
                return

    options = ServiceOptions(
        config=config, captions=load_captions(captions_file), devices=["cpu", "cpu"], seed=7,
        worker_batch=2, out=str(out), shard_size=3,
    )
    result = run_service(options, on_tick=kill_a_busy_worker)
    assert killed, "no worker was killed mid-run"
    assert result.stats.restarts >= 1 and result.stats.requeued >= 1

    manifest = read_manifest(out)
    listed = [c for s in manifest.shards for c in s.caption_ids]
    samples = list(wds.WebDataset([str(out / s.name) for s in manifest.shards], shardshuffle=False))
    seen = Counter(json.loads(s["json"])["caption_id"] for s in samples)
    assert sorted(listed) == list(range(16)) and seen == Counter(range(16))

    for sample in samples[:3]:
        header = json.loads(sample["json"])
        assert sample["txt"].decode() == header["caption"]
        images = np.stack([np.asarray(Image.open(io.BytesIO(sample[f"{j}.png"]))) for j in range(2)])
        direct = _direct_diffusers(tiny_sd_path, header["caption"], header["seeds"], config)
        assert images.shape == direct.shape == (2, 32, 32, 3)
        assert np.abs(images.astype(int) - direct.astype(int)).max() <= 1
