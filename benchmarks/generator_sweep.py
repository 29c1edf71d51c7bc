"""Generator images/s against denoising steps and resolution: ``stablerep-bench generator`` over a grid.

    stablerep-bench generator-sweep --model random:sd15 --steps-list 20,50 --sizes 256,512   # on a GPU
    stablerep-bench generator-sweep --quick     # a tiny random pipeline on the CPU (the code path, not the speed)

Each grid point (steps, size) is one ``run_generator_bench`` call at ``height = width = size``,
with every other generator flag passed through unchanged (model, recipe, scheduler, guidance,
device, captions, worker batch, ...), so a row carries the same three paths as ``generator``:
``diffusers_eager``, ``service_backend`` and ``service_pool`` (images/s), and ``speedup`` (pool /
eager) and ``speedup_backend`` (backend / eager). Each point loads its pipelines and starts its
pool worker afresh; start-up is outside every timed span.

Writes ``generator-sweep.json`` (``results``: the list of rows, each with the point's full
``generator`` result under ``detail``), ``generator-sweep.txt`` (a table) and
``generator-sweep.png`` (images/s against steps, one line per size and path).

``--quick`` is the CPU smoke form: steps 2 and 4 at 32 px, 4 captions of 2 images, batches of 2,
one thread, fp32. Without ``--model`` it builds a tiny random-weight pipeline
(``generator_service.backends.tiny_sd``) in ``OUTPUT/tiny-sd-pipeline`` first (real weights are far
too slow on a CPU); its numbers test the code path, not the speed of any real model.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable

from benchmarks import generator_bench

PATHS = ("diffusers_eager", "service_backend", "service_pool")
SWEPT_FLAGS = ("--steps", "--height", "--width", "--quick")  # set per grid point, or by the sweep's own --quick
QUICK = dict(steps_list=(2, 4), sizes=(32,), captions=4, images_per_group=2, worker_batch=2,
             baseline_worker_batch=2, threads=1, device="cpu")


def int_list(text: str) -> tuple[int, ...]:
    """``"10,20,50"`` -> ``(10, 20, 50)``; every value a positive integer."""
    values = tuple(int(part) for part in text.split(",") if part.strip())
    if not values or min(values) < 1:
        raise ValueError(text)
    return values


def sweep_row(steps: int, size: int, result: dict[str, Any]) -> dict[str, Any]:
    """One grid point's row from its ``run_generator_bench`` result (images/s; None for a path not run)."""
    rates = {name: result["paths"][name]["images_per_second"] if name in result["paths"] else None for name in PATHS}
    return {"steps": steps, "size": size, **rates, "speedup": result.get("speedup_pool_vs_eager"),
            "speedup_backend": result.get("speedup_backend_vs_eager"), "detail": result}


def run_generator_sweep(steps_list: tuple[int, ...], sizes: tuple[int, ...], log: Callable[[str], Any] = print,
                        **bench_kwargs: Any) -> list[dict[str, Any]]:
    """``run_generator_bench(steps=s, height=w, width=w, **bench_kwargs)`` for every s x w; the rows, steps-major.

    The sweep compares diffusers paths, so the backend is ``diffusers`` unless ``bench_kwargs`` says
    otherwise, and the procedural backend (no steps, no baseline) is refused.
    """
    bench_kwargs = {k: v for k, v in bench_kwargs.items() if v is not None}
    if bench_kwargs.setdefault("backend", "diffusers") != "diffusers":
        raise ValueError("generator-sweep times the diffusers paths: --backend must be diffusers")
    rows = []
    for steps in steps_list:
        for size in sizes:
            result = generator_bench.run_generator_bench(steps=steps, height=size, width=size, **bench_kwargs)
            rows.append(sweep_row(steps, size, result))
            rates = ", ".join(f"{name} {rows[-1][name]:.2f}" for name in PATHS if rows[-1][name] is not None)
            log(f"  {steps} steps, {size} px: {rates} images/s")
    return rows


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A text table of the rows: images/s per path and the two speedups."""
    first = rows[0]["detail"]
    config = first["config"]
    recipe = config.get("recipe")
    lines = [f"generator images/s against steps and size on {first['device_name']} ({config['model']}"
             f"{f', recipe {recipe}' if recipe not in (None, 'none') else ''}, scheduler {config.get('scheduler')}, "
             f"guidance {config.get('guidance')}, {first['captions']} captions x {config['images_per_group']} images)",
             f"{'steps':>6}{'size':>6}{'eager':>10}{'backend':>10}{'pool':>10}{'pool/eager':>12}{'backend/eager':>15}"]
    for row in rows:
        lines.append(f"{row['steps']:>6}{row['size']:>6}" + "".join(_number(row[name], ">10.2f") for name in PATHS)
                     + f"{_number(row['speedup'], '>11.2f')}x{_number(row['speedup_backend'], '>14.2f')}x")
    return "\n".join(lines)


def _one_two_five(values: list[float]) -> list[float]:
    """The 1-2-5 ticks (..., 0.5, 1, 2, 5, 10, ...) from just below min(values) to just above max(values)."""
    low, high = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    ticks = [round(m * 10.0**e, 12) for e in range(low, high + 1) for m in (1, 2, 5)]
    below = [t for t in ticks if t <= min(values)]
    above = [t for t in ticks if t >= max(values)]
    return [t for t in ticks if (below[-1] if below else ticks[0]) <= t <= (above[0] if above else ticks[-1])]


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """images/s (log scale) against steps: one colour per path, one line style per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, NullLocator

    colours = dict(zip(PATHS, ("#777777", "#4477aa", "#ee6677")))
    styles = ("o-", "s--", "^:", "d-.")
    sizes = sorted({row["size"] for row in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, size in enumerate(sizes):
        points = sorted((row for row in rows if row["size"] == size), key=lambda row: row["steps"])
        for name in PATHS:
            xy = [(row["steps"], row[name]) for row in points if row[name] is not None]
            if xy:
                ax.plot(*zip(*xy), styles[i % len(styles)], color=colours[name], label=f"{name}, {size} px")
    ax.set_xscale("log")
    ax.set_yscale("log")
    steps = sorted({row["steps"] for row in rows})
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.xaxis.set_minor_locator(NullLocator())
    ticks = _one_two_five([row[name] for row in rows for name in PATHS if row[name] is not None])
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("denoising steps")
    ax.set_ylabel("images/s")
    detail = rows[0]["detail"]
    ax.set_title(f"generator images/s, {detail['config']['model']} on {detail['device_name']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class _WithoutSweptFlags:
    """Forwards ``add_argument`` to a parser, except for the flags the sweep sets itself (``SWEPT_FLAGS``)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser

    def add_argument(self, *flags: str, **kwargs: Any) -> None:
        if flags[0] not in SWEPT_FLAGS:
            self.parser.add_argument(*flags, **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``stablerep-bench generator-sweep`` flags: the grid, plus every ``generator`` flag but the swept ones."""
    grid = parser.add_argument_group("grid")
    grid.add_argument("--steps-list", type=int_list, default=(10, 20, 50),
                      help="denoising steps, comma-separated (default: 10,20,50)")
    grid.add_argument("--sizes", type=int_list, default=(256, 512),
                      help="height = width in pixels, comma-separated (default: 256,512)")
    grid.add_argument("--quick", action="store_true",
                      help="steps 2,4 at 32 px, 4 small captions, one CPU thread; without --model on a tiny random "
                           "pipeline it builds in OUTPUT/tiny-sd-pipeline (tests the code path, not the speed)")
    generator_bench.add_arguments(_WithoutSweptFlags(parser.add_argument_group("generator (every grid point)")))


def tiny_pipeline(folder: Path, log: Callable[[str], Any] = print) -> Path:
    """The tiny random-weight pipeline in ``folder``, built there first unless it is already there."""
    if not (folder / "model_index.json").is_file():
        from generator_service.backends.tiny_sd import make_tiny_sd_pipeline

        log(f"--quick: building a tiny random-weight pipeline in {folder}")
        make_tiny_sd_pipeline(folder)
    return folder


def run_from_args(args: argparse.Namespace, log: Callable[[str], Any] = print) -> tuple[list[dict[str, Any]], str]:
    """Run with parsed flags; return (rows, table)."""
    if args.quick:
        if args.model is None:
            args.model = str(tiny_pipeline(Path(args.output) / "tiny-sd-pipeline", log))
        for name, value in QUICK.items():
            setattr(args, name, value)
        args.dtype = args.dtype or "fp32"
    kwargs = {k: v for k, v in vars(args).items()
              if k not in ("output", "func", "bench", "quick", "name", "steps_list", "sizes")}
    rows = run_generator_sweep(args.steps_list, args.sizes, log=log, **kwargs)
    return rows, format_table(rows)
