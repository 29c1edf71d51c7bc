"""stablerep-bench flops: counts on the real SD1.5 / ViT-B/16 architectures (meta tensors, CPU)."""
from __future__ import annotations

import json

import pytest

from benchmarks.cli import main
from benchmarks.flops import generator_flops, run_flops, trainer_flops


def test_quick_cli_writes_json_with_its_keys(tmp_path):
    assert main(["flops", "--quick", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "flops.json").read_text())["results"]
    for key in ("tflop_per_image", "generator_images_per_s_limit", "trainer_images_per_s_limit", "peak_tflops"):
        assert results[key] > 0
    breakdown = results["generator"]["breakdown_tflop"]
    assert set(breakdown) == {"unet", "unet_dense", "unet_attention", "text_encoder", "vae_decode"}
    assert results["tflop_per_image"] == pytest.approx(
        breakdown["unet"] + breakdown["text_encoder"] + breakdown["vae_decode"])
    assert results["generator_images_per_s_limit"] == pytest.approx(798 / results["tflop_per_image"])
    assert (tmp_path / "flops.png").is_file()


def test_counts_agree_with_independent_anchors_within_10_percent():
    """DESIGN.md: UNet 0.677 TFLOP/sample at 512 (0.172 at 256, dense part), VAE decode 2.48, ViT-B/16 step 0.101."""
    at_512 = generator_flops(steps=1, guidance=1.0, height=512, width=512)["per_forward_tflop"]
    at_256 = generator_flops(steps=1, guidance=1.0, height=256, width=256)["per_forward_tflop"]
    assert at_512["unet_dense"] == pytest.approx(0.677, rel=0.10)
    assert at_256["unet_dense"] == pytest.approx(0.172, rel=0.10)
    assert at_512["vae_decode"] == pytest.approx(2.48, rel=0.10)
    assert trainer_flops()["tflop_per_image"] == pytest.approx(0.101, rel=0.10)


def test_guidance_doubles_and_steps_multiply_the_unet():
    base = generator_flops(scheduler="ddim", steps=3, guidance=1.0, height=64, width=64)
    cfg = generator_flops(scheduler="ddim", steps=6, guidance=2.0, height=64, width=64)
    assert base["unet_calls"] == 3 and cfg["unet_calls"] == 6
    assert cfg["breakdown_tflop"]["unet"] == pytest.approx(4 * base["breakdown_tflop"]["unet"])
    assert cfg["breakdown_tflop"]["vae_decode"] == base["breakdown_tflop"]["vae_decode"]
    # Heun evaluates the UNet about twice per step
    assert generator_flops(scheduler="heun", steps=5, guidance=1.0, height=64, width=64)["unet_calls"] == 9


def test_bad_recipe_is_named():
    with pytest.raises(ValueError, match="--scheduler 'nope'"):
        generator_flops(scheduler="nope", height=64, width=64)
    with pytest.raises(ValueError, match="multiples of 8"):
        generator_flops(height=100, width=64)
    with pytest.raises(ValueError, match="--peak-tflops"):
        run_flops(height=64, width=64, peak_tflops=0)


def test_recipe_flops_through_the_bench_cli(tmp_path, capsys):
    assert main(["flops", "--recipe", "lcm4", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "flops.json").read_text())["results"]
    (row,) = results["recipes"]
    assert row["recipe"] == "lcm4" and row["unet_passes_per_image"] == 4  # 4 steps, no guidance pass
    assert 0 < row["fraction_of_paper"] < 1 / 10  # 4 passes against the paper's 100
    assert "| lcm4 (sd15) | 4 |" in capsys.readouterr().out
    assert main(["flops", "--recipe", "nope", "--output", str(tmp_path)]) == 2
    assert "--recipe 'nope': unknown" in capsys.readouterr().err
