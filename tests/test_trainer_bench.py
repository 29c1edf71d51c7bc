"""The trainer benchmark runs end to end on CPU with a tiny model and reports every measurement."""
from __future__ import annotations

import pytest

from benchmarks.trainer_bench import format_table, run_trainer_bench


def test_trainer_bench_tiny_cpu():
    results = run_trainer_bench(
        model="vit_tiny_patch16_224", img_size=32, model_kwargs={"patch_size": 8, "depth": 1}, head=(32, 16, 2),
        captions_per_step=4, draw_per_caption=3, stored_size=40, precision="no", steps=2, warmup=1,
        augment_batch=16, augment_iters=1, device="cpu",
    )
    assert results["images_per_step"] == 12
    assert results["bare_step"]["eager_images_per_s"] > 0 and "compile_images_per_s" not in results["bare_step"]
    fed = results["fed_step"]
    assert fed["source"] == "replay" and fed["images_per_s"] > 0
    assert fed["source_stats"]["batches"] == 3 and fed["source_stats"]["draws"] == 12  # warmup + timed steps
    assert results["fed_over_bare"] == pytest.approx(fed["images_per_s"] / results["bare_step"]["eager_images_per_s"])
    assert results["augment"]["images_per_s"] > 0 and results["augment"]["batch"] == 16
    table = format_table(results)
    assert "fed step (replay source)" in table and "GPUAugment alone" in table


def test_trainer_bench_rejects_bad_arguments():
    with pytest.raises(ValueError, match="needs generator endpoints"):
        run_trainer_bench(source="online", device="cpu")
    with pytest.raises(ValueError, match="precision"):
        run_trainer_bench(precision="fp8", device="cpu")
