"""The whole online system in one run: N generator services feeding one trainer over protocol v1.

Each generator is a real generator service (``run_service`` with ``bind``: worker process, queue,
``GroupServer`` on 127.0.0.1) in a thread of this process; procedural on CPU, or any recipe the
``generator`` flags give. ``generator_rate`` (groups/s per generator, the service's
``max_groups_per_s`` throttle) makes a CPU service behave like a slower device, so the
generator:trainer ratio of a GPU cluster can be simulated on a laptop. The trainer is the real fed
step (``OnlineSource`` -> ``method(model, batch, augment)`` -> backward -> AdamW) of
``benchmarks.trainer_bench`` on the same model the ``trainer`` bench uses.

Measured over ``steps`` timed steps (after ``warmup`` untimed ones), from the counters the services
keep (the same ones their ``--metrics-port`` endpoints serve):

- ``trainer_images_per_s``: images trained per second;
- ``generated_images_per_s``: images the generators delivered per second (all generators);
- ``trainer_stall_fraction``: share of the time the step waited for data (replay ``stall_seconds``);
- ``generator_idle_fraction``: share of worker time idle for backpressure (queue full, no credit);
- ``mean_reuse``: draws per group over the groups that arrived in the window (``draws / added``);
- ``image_reuse``: trained images per generated image in the window;
- ``evicted_unused_fraction``: share of the groups that arrived in the window and were evicted
  unused (counted at eviction, in the window).
"""
from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import torch
from trainer.kwargs_arg import add_kwargs_argument, merge_kwargs

DEFAULTS = {"generators": 2, "generator_rate": None, "images_per_group": 2, "image_size": 32, "captions": 576,
            "model": "vit_tiny_patch16_224", "img_size": 32, "model_kwargs": {"patch_size": 8, "depth": 1},
            "head": (32, 16, 2), "captions_per_step": 8, "draw_per_caption": 2, "steps": 40, "warmup": 4,
            "max_reuse": None, "capacity_groups": 64, "credits": 8}


class _Generator:
    """One generator service in a thread; ``pool``/``server`` are those of the running service."""

    def __init__(self, options: Any, metrics: Any = None) -> None:
        from generator_service.pool import StopSignal

        self.options, self.metrics = options, metrics
        self.stop = StopSignal()
        self.started = threading.Event()
        self.endpoint: str | None = None
        self.pool = self.server = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="online-bench-generator")

    def _on_start(self, info: dict[str, Any]) -> None:
        self.endpoint = info["endpoint"]

    def _on_tick(self, pool: Any, server: Any) -> None:
        self.pool, self.server = pool, server
        if self.metrics is not None:
            self.metrics.tick(pool, server)
        self.started.set()

    def _run(self) -> None:
        from generator_service.service import run_service

        try:
            run_service(self.options, stop=self.stop, on_start=self._on_start, on_tick=self._on_tick)
        except Exception as exc:  # noqa: BLE001  (any failure is re-raised by wait_started)
            self.error = exc
        finally:
            self.started.set()

    def start(self) -> _Generator:
        self.thread.start()
        return self

    def wait_started(self, timeout: float) -> str:
        if not self.started.wait(timeout) or self.error is not None or self.endpoint is None:
            raise RuntimeError(f"online bench: a generator service did not start within {timeout:.0f} s"
                               + (f": {self.error!r}" if self.error else ""))
        return self.endpoint

    def counters(self) -> dict[str, float]:
        stats = self.pool.stats()
        return {"images": stats.images_delivered, "workers": len(stats.workers),
                "idle_s": sum(w["idle_backpressure_s"] for w in stats.workers)}

    def close(self) -> None:
        self.stop.request()
        self.stop.request()  # a second request stops at once: no drain of in-flight groups
        self.thread.join(timeout=60)
        if self.metrics is not None:
            self.metrics.close()


def run_online_bench(
    generators: int = 2, generator_rate: float | None = None, images_per_group: int = 2, image_size: int = 32,
    captions: int = 576, model: str = "vit_tiny_patch16_224", img_size: int = 32, model_kwargs: dict | None = None,
    head: tuple[int, int, int] = (32, 16, 2), captions_per_step: int = 8, draw_per_caption: int = 2,
    steps: int = 40, warmup: int = 4, max_reuse: int | None = None, capacity_groups: int = 64, credits: int = 8,
    precision: str = "no", device: str | None = None, metrics_port: int | None = None,
    generator_metrics_port: int | None = None, start_timeout: float = 120.0, on_step=None,
) -> dict[str, Any]:
    """Start ``generators`` services, train ``warmup + steps`` steps fed by them, return the measurements.

    ``metrics_port`` / ``generator_metrics_port`` (first generator) serve the live metrics during
    the run; ``on_step(step)`` is called after every step (tests scrape the endpoint from it).
    """
    from benchmarks.trainer_bench import _autocast, _model_and_optimizer
    from generator_service.config import GeneratorConfig
    from generator_service.procedural import sample_captions
    from trainer.augment import GPUAugment
    from trainer.augment_config import AugmentConfig
    from trainer.objectives.methods import build_method
    from trainer.data.config import DataConfig, ReplayConfig
    from trainer.data.sources.online import OnlineSource

    if generators < 1:
        raise ValueError(f"--generators must be >= 1, got {generators}")
    if generator_rate is not None and not generator_rate > 0:
        raise ValueError(f"--generator-rate must be > 0 groups/s, got {generator_rate}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {steps}, {warmup}")
    device_t = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    texts = sample_captions(captions, seed=0)
    config = GeneratorConfig(backend="procedural", images_per_group=images_per_group, height=image_size,
                             width=image_size, save_size=image_size)
    services: list[_Generator] = []
    source = None
    trainer_live = None
    try:
        _start_generators(services, generators, texts, config, generator_rate, generator_metrics_port)
        endpoints = [g.wait_started(start_timeout) for g in services]
        if metrics_port is not None:
            from trainer.live_metrics import TrainerMetrics

            trainer_live = TrainerMetrics(metrics_port, addr="127.0.0.1")

        net, optimizer = _model_and_optimizer(model, img_size, dict(model_kwargs or {}), head, device_t,
                                              compile_model=False)
        method = build_method("stablerep", temperature=0.1)
        augment = GPUAugment.from_config(AugmentConfig(strong=True), img_size=img_size)
        data = DataConfig(generators=list(endpoints), draw_per_caption=draw_per_caption, image_size=image_size,
                          credits=credits, connect_timeout=start_timeout, sample_timeout=600)
        replay = ReplayConfig(capacity_groups=capacity_groups, max_reuse=max_reuse)
        source = OnlineSource(data, replay, captions_per_rank=captions_per_step, device=device_t)
        images_per_step = captions_per_step * draw_per_caption
        lr = optimizer.param_groups[0]["lr"]

        def step(index: int, seconds: list[float]) -> None:
            t0 = time.perf_counter()
            batch = source.next_batch().to(device_t, non_blocking=True)
            with _autocast(device_t, precision):
                loss, _ = method(net, batch, augment)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = loss.item()
            seconds.append(time.perf_counter() - t0)
            if trainer_live is not None:
                recent = seconds[-10:]
                trainer_live.update(index + 1, {"train/loss": loss_value, "train/lr": lr,
                                                "train/images_per_s": images_per_step * len(recent) / sum(recent),
                                                "train/images_seen": (index + 1) * images_per_step},
                                    source.stats())
            if on_step is not None:
                on_step(index + 1)

        seconds: list[float] = []
        for i in range(warmup):
            step(i, seconds)

        def snapshot() -> dict[str, float]:
            s = source.stats()
            gens = [g.counters() for g in services]
            return {"t": time.perf_counter(), "stall": s["stall_seconds"], "draws": s["draws"], "added": s["added"],
                    "evicted_unused": s["evicted_unused"], "images": sum(c["images"] for c in gens),
                    "idle": sum(c["idle_s"] for c in gens), "workers": sum(c["workers"] for c in gens)}

        before = snapshot()
        for i in range(warmup, warmup + steps):
            step(i, seconds)
        after = snapshot()
        stats_end = source.stats()
    finally:
        if source is not None:
            source.close()
        for g in services:
            g.close()
        if trainer_live is not None:
            trainer_live.close()
    return _measurements(before, after, stats_end, steps=steps, images_per_step=images_per_step, settings={
        "generators": generators,
        "generator_rate_groups_per_s": generator_rate,
        "images_per_group": images_per_group,
        "draw_per_caption": draw_per_caption,
        "captions_per_step": captions_per_step,
        "images_per_step": images_per_step,
        "max_reuse": max_reuse,
        "capacity_groups": capacity_groups,
        "steps": steps,
    })


def _start_generators(services: list, generators: int, texts: list[str], config, generator_rate: float | None,
                      generator_metrics_port: int | None) -> None:
    """Start ``generators`` in-process services into ``services`` (so the caller closes the ones started
    even when a later one fails); generator i serves caption shard i/N (positions i, i+N, ...), as a
    cluster launch would, and the first serves live metrics on ``generator_metrics_port``."""
    from generator_service.captions import CaptionSet
    from generator_service.service import ServiceOptions

    for index in range(generators):
        metrics = None
        if index == 0 and generator_metrics_port is not None:
            from generator_service.live_metrics import GeneratorMetrics

            metrics = GeneratorMetrics(generator_metrics_port, addr="127.0.0.1", every_s=0.2)
        ids = list(range(index, len(texts), generators))
        caption_set = CaptionSet(path="<procedural>", caption_ids=ids, captions=[texts[i] for i in ids],
                                 total=len(texts), shard=(index, generators))
        options = ServiceOptions(config=config, captions=caption_set, devices=["cpu"], seed=0,
                                 worker_batch=1, bind="tcp://127.0.0.1:*", queue=16,
                                 max_groups_per_s=generator_rate, drain_timeout=10.0)
        services.append(_Generator(options, metrics).start())


def _measurements(before: dict[str, float], after: dict[str, float], stats_end: dict[str, Any], *, steps: int,
                  images_per_step: int, settings: dict[str, Any]) -> dict[str, Any]:
    """The result of a run: ``settings``, then rates and fractions over the timed steps (``before`` and
    ``after``: counter snapshots around them)."""
    d = {k: after[k] - before[k] for k in after}
    elapsed = d["t"]
    trained = steps * images_per_step
    return {
        **settings,
        "seconds": elapsed,
        "trainer_images_per_s": trained / elapsed,
        "generated_images_per_s": d["images"] / elapsed,
        "trainer_stall_fraction": min(1.0, d["stall"] / elapsed),
        "generator_idle_fraction": d["idle"] / (after["workers"] * elapsed) if after["workers"] else 0.0,
        "mean_reuse": d["draws"] / d["added"] if d["added"] else float("inf"),
        "image_reuse": trained / d["images"] if d["images"] else float("inf"),
        "evicted_unused_fraction": d["evicted_unused"] / d["added"] if d["added"] else 0.0,
        "source_stats_end": {k: v for k, v in stats_end.items() if isinstance(v, (int, float, str))},
    }


def format_table(r: dict[str, Any]) -> str:
    rate = r["generator_rate_groups_per_s"]
    head = (f"online: {r['generators']} generator(s) at {'unthrottled' if rate is None else f'{rate:g} groups/s'}, "
            f"{r['images_per_step']} images/step, max reuse {r['max_reuse']}, buffer {r['capacity_groups']} groups")
    rows = [("trainer images/s", f"{r['trainer_images_per_s']:.1f}"),
            ("generated images/s", f"{r['generated_images_per_s']:.1f}"),
            ("trainer stall", f"{r['trainer_stall_fraction']:.1%}"),
            ("generator idle", f"{r['generator_idle_fraction']:.1%}"),
            ("mean reuse (draws/group)", f"{r['mean_reuse']:.2f}"),
            ("evicted unused", f"{r['evicted_unused_fraction']:.1%}")]
    return "\n".join([head] + [f"{name:<26}{value:>10}" for name, value in rows])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generators", type=int, default=DEFAULTS["generators"], help="generator services")
    parser.add_argument("--generator-rate", type=float, help="throttle: groups/s per generator (default: unthrottled)")
    parser.add_argument("--images-per-group", type=int, default=DEFAULTS["images_per_group"])
    parser.add_argument("--image-size", type=int, default=DEFAULTS["image_size"], help="generated image side")
    parser.add_argument("--model", default=DEFAULTS["model"])
    parser.add_argument("--img-size", type=int, default=DEFAULTS["img_size"])
    add_kwargs_argument(parser, "--model-kwargs", default=None,
                        help=f"timm.create_model arguments (default: {DEFAULTS['model_kwargs']})")
    parser.add_argument("--captions-per-step", type=int, default=DEFAULTS["captions_per_step"])
    parser.add_argument("--draw-per-caption", type=int, default=DEFAULTS["draw_per_caption"])
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--warmup", type=int, default=DEFAULTS["warmup"])
    parser.add_argument("--max-reuse", type=int, help="draws after which a group is retired (default: unlimited)")
    parser.add_argument("--capacity-groups", type=int, default=DEFAULTS["capacity_groups"])
    parser.add_argument("--precision", default="no", choices=["bf16", "fp16", "no"])
    parser.add_argument("--device")
    parser.add_argument("--metrics-port", type=int, help="serve the trainer's metrics here during the run")
    parser.add_argument("--generator-metrics-port", type=int, help="serve the first generator's metrics here")
    parser.add_argument("--quick", action="store_true", help="1 generator, 6 timed steps")


def run_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], str, dict[str, float]]:
    if args.quick:
        args.generators, args.steps, args.warmup = 1, 6, 2
    result = run_online_bench(
        generators=args.generators, generator_rate=args.generator_rate, images_per_group=args.images_per_group,
        image_size=args.image_size, model=args.model, img_size=args.img_size, model_kwargs=merge_kwargs(args.model_kwargs) or dict(DEFAULTS["model_kwargs"]),
        captions_per_step=args.captions_per_step, draw_per_caption=args.draw_per_caption, steps=args.steps,
        warmup=args.warmup, max_reuse=args.max_reuse, capacity_groups=args.capacity_groups,
        precision=args.precision, device=args.device, metrics_port=args.metrics_port,
        generator_metrics_port=args.generator_metrics_port,
    )
    bars = {"trainer": result["trainer_images_per_s"], "generated": result["generated_images_per_s"]}
    return result, format_table(result), bars
