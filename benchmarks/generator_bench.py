"""Generator throughput: this service's path vs a plain diffusers pipeline call, same recipe, same run.

Three numbers, in images per second, on one device:

- ``diffusers_eager``: the baseline a user writes by hand: ``pipe(prompt, num_images_per_prompt=m,
  generator=[...], output_type="np")`` with ``baseline_worker_batch`` captions per call (default:
  ``worker_batch``, the service's captions per call, so the speedup does not measure batch size),
  then uint8 conversion on the host. Eager, the same recipe: dtype, scheduler, steps, guidance,
  size, and the same fused LoRA and decoder (``prepare_pipeline``).
- ``service_backend``: the service's ``DiffusersBackend`` in this process, batches handed over with
  ``submit`` as the worker does (its own loop: no unconditional batch at guidance <= 1, distinct
  captions encoded once, decode of batch k overlapping denoising of batch k+1; channels_last on
  CUDA, resize + uint8 on the device, ``torch.compile`` when ``compile``).
- ``service_pool``: end to end through the worker pool (a worker process, images back over a pipe,
  turned into protocol groups), steady state: the worker's start-up and first task are excluded.

The procedural backend has no diffusers baseline; it reports the pool path only.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from generator_service.backends import BACKENDS
from generator_service.backends.compile_support import compile_unavailable
from generator_service.config import GeneratorConfig
from generator_service.pool import WorkerPool
from generator_service.procedural import sample_captions
from generator_service.recipes import RECIPE_NAMES
from generator_service.seeds import image_seed
from generator_service.service import work_items
from protocol import Group


def _seeds(caption_ids: list[int], m: int, base_seed: int = 0) -> list[list[int]]:
    return [[image_seed(base_seed, c, j) for j in range(m)] for c in caption_ids]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_diffusers_eager(config: GeneratorConfig, device: str, captions: list[str], worker_batch: int = 1,
                          warmup_calls: int = 1) -> dict[str, Any]:
    """Plain pipeline calls over ``captions`` (after ``warmup_calls`` untimed calls); images/s."""
    import torch

    from generator_service.backends.diffusers_backend import TORCH_DTYPES, prepare_pipeline

    pipe = prepare_pipeline(config, getattr(torch, TORCH_DTYPES[config.dtype])).to(device)
    pipe.set_progress_bar_config(disable=True)
    m = config.images_per_group
    seeds = _seeds(list(range(len(captions))), m)

    def call(start: int) -> np.ndarray:
        chunk = captions[start : start + worker_batch]
        generators = [torch.Generator("cpu").manual_seed(s) for group in seeds[start : start + worker_batch] for s in group]
        images = pipe(
            prompt=chunk, num_images_per_prompt=m, generator=generators, num_inference_steps=config.steps,
            guidance_scale=config.guidance, eta=config.eta, height=config.height, width=config.width, output_type="np",
        ).images
        return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)

    for _ in range(warmup_calls):
        call(0)
    _sync(device)
    started = time.perf_counter()
    images = 0
    for start in range(0, len(captions), worker_batch):
        images += call(start).shape[0]
    _sync(device)
    seconds = time.perf_counter() - started
    pipe = None  # free the pipeline before the next path loads its own
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"images": images, "seconds": round(seconds, 4), "images_per_second": images / seconds}


def bench_service_backend(config: GeneratorConfig, device: str, captions: list[str], worker_batch: int,
                          warmup_calls: int = 1) -> dict[str, Any]:
    """``create_backend(config).submit`` over ``captions`` in batches of ``worker_batch``, then ``drain``; images/s."""
    from generator_service.backends import create_backend

    backend = create_backend(config, device)
    m = config.images_per_group
    seeds = _seeds(list(range(len(captions))), m)
    for _ in range(warmup_calls):
        backend.generate(captions[:worker_batch], seeds[:worker_batch])
    _sync(device)
    started = time.perf_counter()
    finished: list[np.ndarray] = []
    failures: list[BaseException] = []
    for start in range(0, len(captions), worker_batch):
        backend.submit(captions[start : start + worker_batch], seeds[start : start + worker_batch],
                       finished.append, failures.append)
    backend.drain()
    _sync(device)
    seconds = time.perf_counter() - started
    backend.close()
    if failures:
        raise failures[0]
    images = sum(out.shape[0] * out.shape[1] for out in finished)
    return {"images": images, "seconds": round(seconds, 4), "images_per_second": images / seconds}


class _TimingSink:
    """Counts delivered groups with their arrival times."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, int]] = []

    def offer(self, group: Group) -> bool:
        self.arrivals.append((time.perf_counter(), group.num_images))
        return True


def bench_service_pool(config: GeneratorConfig, device: str, captions: list[str], worker_batch: int,
                       threads: int | None = None) -> dict[str, Any]:
    """The worker pool on one device; steady-state images/s after the first task (warm-up, compile)."""
    from generator_service.captions import CaptionSet

    caption_set = CaptionSet(path="<bench>", caption_ids=list(range(len(captions))), captions=list(captions),
                             total=len(captions))
    fingerprint = config.fingerprint()
    pool = WorkerPool(config, fingerprint, [device], worker_batch=worker_batch, threads_per_worker=threads)
    sink = _TimingSink()
    items = work_items(caption_set, fingerprint, 0, config.images_per_group, epochs=1)
    pool.run(items, sink)
    warm = sink.arrivals[worker_batch - 1][0] if len(sink.arrivals) > worker_batch else None
    timed = sink.arrivals[worker_batch:]
    if warm is None or not timed:
        raise ValueError(f"the pool bench needs more than one task: {len(captions)} captions, batch {worker_batch}")
    seconds = timed[-1][0] - warm
    images = sum(n for _, n in timed)
    return {"images": images, "seconds": round(seconds, 4), "images_per_second": images / seconds,
            "worker": pool.stats().workers[0]}


def run_generator_bench(
    model: str | None = None,
    backend: str | None = None,
    recipe: str | None = None,
    lora: str | None = None,
    lora_scale: float | None = None,
    vae: str | None = None,
    device: str | None = None,
    scheduler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    save_size: int | None = None,
    images_per_group: int = 4,
    worker_batch: int = 8,
    captions: int = 32,
    dtype: str | None = None,
    compile: bool | None = None,
    baseline_worker_batch: int | None = None,
    include_backend: bool = True,
    threads: int | None = None,
    repeats: int = 1,
) -> dict[str, Any]:
    """Measure the generator paths (module docstring) and return a JSON-able dict.

    Defaults: on CUDA, diffusers ``random:sd15`` fp16 with ``torch.compile`` for the service (the
    baseline stays eager); without CUDA, the procedural backend unless ``model`` names a pipeline.
    ``threads``: torch CPU threads for every path (this process and the pool's worker); default:
    torch's own choice here, the pool's default in the worker. ``repeats``: the in-process paths
    (diffusers eager, service backend) run this many times, alternating, and the fastest run of each
    is kept (a loaded machine slows whichever runs at the wrong moment).
    """
    import torch

    cuda = torch.cuda.is_available()
    device = device or ("cuda:0" if cuda else "cpu")
    if backend is None:
        backend = "diffusers" if (model is not None or recipe is not None or cuda) else "procedural"
    fields: dict[str, Any] = dict(backend=backend, images_per_group=images_per_group)
    if backend == "diffusers":
        fields.update(model=model or ("random:sd15" if recipe is None else None), recipe=recipe, lora=lora,
                      lora_scale=lora_scale, vae=vae, scheduler=scheduler, steps=steps, guidance=guidance,
                      height=height, width=width, save_size=save_size,
                      dtype=dtype or ("fp16" if device.startswith("cuda") else "fp32"))
    else:
        fields.update(height=height, width=width, save_size=save_size)
    config = GeneratorConfig(**{k: v for k, v in fields.items() if v is not None})
    compile_skipped = None  # why the CUDA default of compiling could not be kept, if it could not
    if backend == "diffusers" and compile is None:  # default: compile on CUDA where inductor can work
        on_cuda = device.startswith("cuda")
        compile_skipped = compile_unavailable("cuda") if on_cuda else None
        compile = on_cuda and compile_skipped is None
    service_config = config.replace(compile=bool(compile)) if backend == "diffusers" else config
    texts = sample_captions(captions, seed=0)
    if baseline_worker_batch is None:  # equal captions per call on both sides of the comparison
        baseline_worker_batch = worker_batch
    result: dict[str, Any] = {
        "device": device,
        "device_name": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu",
        "config": config.to_dict(),
        "service_compile": service_config.compile,
        "service_compile_skipped": compile_skipped,
        "captions": captions,
        "worker_batch": worker_batch,
        "baseline_worker_batch": baseline_worker_batch,
        "threads": threads,
        "paths": {},
    }
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        if backend == "diffusers":
            runs: dict[str, list[dict[str, Any]]] = {"diffusers_eager": [], "service_backend": []}
            for _ in range(max(1, repeats)):
                runs["diffusers_eager"].append(bench_diffusers_eager(config, device, texts, baseline_worker_batch))
                if include_backend:
                    runs["service_backend"].append(bench_service_backend(service_config, device, texts, worker_batch))
            for name, done in runs.items():
                if done:
                    best = max(done, key=lambda run: run["images_per_second"])
                    result["paths"][name] = {**best, "runs_images_per_second": [r["images_per_second"] for r in done]}
        result["paths"]["service_pool"] = bench_service_pool(service_config, device, texts, worker_batch, threads)
    finally:
        torch.set_num_threads(threads_before)
    baseline = result["paths"].get("diffusers_eager")
    if baseline:
        result["speedup_pool_vs_eager"] = result["paths"]["service_pool"]["images_per_second"] / baseline["images_per_second"]
        if "service_backend" in result["paths"]:
            result["speedup_backend_vs_eager"] = (
                result["paths"]["service_backend"]["images_per_second"] / baseline["images_per_second"]
            )
    return result


def format_table(result: dict[str, Any]) -> str:
    """A small text table of ``run_generator_bench``'s result."""
    recipe = result["config"].get("recipe")
    lines = [f"generator throughput on {result['device_name']} ({result['config']['backend']}, "
             f"{result['config']['model']}{f', recipe {recipe}' if recipe not in (None, 'none') else ''})", f"{'path':<18}{'images/s':>12}{'images':>10}{'seconds':>10}"]
    for name, run in result["paths"].items():
        lines.append(f"{name:<18}{run['images_per_second']:>12.2f}{run['images']:>10}{run['seconds']:>10.2f}")
    if "speedup_backend_vs_eager" in result:
        lines.append(f"speedup (backend vs diffusers eager): {result['speedup_backend_vs_eager']:.2f}x")
    if "speedup_pool_vs_eager" in result:
        lines.append(f"speedup (pool vs diffusers eager): {result['speedup_pool_vs_eager']:.2f}x")
    skipped = result.get("service_compile_skipped")
    if skipped:
        lines.append(f"torch.compile skipped for the service paths: {skipped}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``stablerep-bench generator`` flags."""
    parser.add_argument("--model", help="diffusers model path or hub id, or random:sd15 (default on GPU)")
    parser.add_argument("--backend", choices=BACKENDS.names(), help="generator backend (default: the recipe's)")
    parser.add_argument("--recipe", help=f"{' | '.join(RECIPE_NAMES)} (both paths run it; flags override)")
    parser.add_argument("--lora", help="LoRA adapter (or 'none'), fused in both paths")
    parser.add_argument("--lora-scale", type=float, help="LoRA scale when fused")
    parser.add_argument("--vae", help="default | tiny:PATH_OR_ID | tiny:random, in both paths")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when present)")
    parser.add_argument("--scheduler", help="diffusers scheduler (ddim, dpm++, ...)")
    parser.add_argument("--steps", type=int, help="denoising steps")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    parser.add_argument("--height", type=int, help="generated height in pixels")
    parser.add_argument("--width", type=int, help="generated width in pixels")
    parser.add_argument("--save-size", type=int, help="side of the stored images")
    parser.add_argument("--images-per-group", type=int, default=4, help="images per caption group (default: %(default)s)")
    parser.add_argument("--worker-batch", type=int, default=8, help="captions per backend call (default: %(default)s)")
    parser.add_argument("--captions", type=int, default=32, help="captions timed (default: %(default)s)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="pipeline dtype")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the UNet (default: on CUDA)")
    parser.add_argument("--baseline-worker-batch", type=int, help="captions per call of the plain diffusers baseline (default: --worker-batch, equal batches)")
    parser.add_argument("--threads", type=int, help="torch CPU threads for every path")
    parser.add_argument("--quick", action="store_true", help="the procedural backend, 8 small captions (tests)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of the in-process paths, best kept")


def run_from_args(args: Any) -> tuple[dict[str, Any], str, dict[str, float]]:
    """Run with parsed flags; return (results, table, bars in images/s)."""
    if args.quick:
        args.backend, args.height, args.width, args.save_size, args.captions = "procedural", 32, 32, 32, 8
        args.images_per_group, args.worker_batch, args.threads = 2, 2, 1
    kwargs = {k: v for k, v in vars(args).items() if k not in ("output", "func", "bench", "quick", "name")}
    result = run_generator_bench(**kwargs)
    bars = {name: run["images_per_second"] for name, run in result["paths"].items()}
    return result, format_table(result), bars
