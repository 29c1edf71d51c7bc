"""benchmarks/generator_bench.py on the CPU: the tiny pipeline through all three paths."""
from __future__ import annotations

import json

from benchmarks.generator_bench import format_table, run_generator_bench


def test_generator_bench_reports_all_paths(tiny_sd_path):
    result = run_generator_bench(
        model=str(tiny_sd_path), device="cpu", steps=2, height=32, width=32, save_size=32,
        images_per_group=2, worker_batch=2, captions=6, threads=1,
    )
    json.dumps(result)  # JSON-able
    paths = result["paths"]
    assert set(paths) == {"diffusers_eager", "service_backend", "service_pool"}
    assert paths["diffusers_eager"]["images"] == 12 and paths["service_backend"]["images"] == 12
    assert paths["service_pool"]["images"] == 8  # the first task (2 captions) is the warm-up
    for run in paths.values():
        assert run["images_per_second"] > 0 and run["seconds"] > 0
    assert result["speedup_pool_vs_eager"] == (
        paths["service_pool"]["images_per_second"] / paths["diffusers_eager"]["images_per_second"]
    )
    assert "service_pool" in format_table(result)
