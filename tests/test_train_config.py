"""Trainer config: presets, YAML + flag precedence, validation errors, schedule values."""
from __future__ import annotations

import math

import pytest
import yaml

from trainer import cli
from trainer.config import ConfigError, TrainConfig, build_config, from_dict, load_yaml, write_config
from trainer.schedule import lr_at

GEN = ["--generators", "tcp://127.0.0.1:5555"]


def test_paper_preset_is_the_papers_recipe():
    cfg, _ = cli.parse_config(["--preset", "paper_vitb16_cc12m_1x", *GEN])
    assert cfg.model.name == "vit_base_patch16_224"
    assert (cfg.model.head_hidden, cfg.model.head_out, cfg.model.head_layers) == (4096, 256, 3)
    assert (cfg.data.captions_per_step, cfg.data.draw_per_caption) == (1376, 6)
    assert cfg.optim.betas == [0.9, 0.98] and cfg.optim.weight_decay == 0.1
    assert cfg.method.name == "stablerep" and cfg.method.temperature == 0.1 and cfg.augment.strong
    assert cfg.run.precision == "bf16"
    assert cfg.peak_lr() == pytest.approx(3.225e-3)  # official: blr x 43 x 32 x 6 / 256 x num_crop 1 / 2
    steps_per_epoch = 10_000_000 // 1376  # official: len(dataset) // batch, the loader drops the last one
    assert cfg.steps_per_epoch() == steps_per_epoch == 7267
    assert cfg.total_steps() == math.ceil(15 * steps_per_epoch)
    assert cfg.warmup_steps() == round(0.5 * steps_per_epoch)
    assert cfg.crop_size() == 224


def test_precedence_defaults_preset_config_file_flags(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({
        "optim": {"base_lr": 5e-4, "weight_decay": 0.05},
        "data": {"captions_per_step": 16},
        "model": {"model_kwargs": {"depth": 2}},
    }))
    cfg, _ = cli.parse_config([
        "--preset", "cpu_small", "--config", str(override), *GEN,
        "--captions-per-step", "8", "--model-kwargs", "embed_dim=96", "--weak-aug", "--steps", "7", "--warmup-steps", "2",
    ])
    assert cfg.model.name == "vit_tiny_patch16_224"  # preset
    assert cfg.optim.weight_decay == 0.05 and cfg.optim.base_lr == 5e-4  # config file over preset
    assert cfg.data.captions_per_step == 8  # flag over config file
    assert cfg.schedule.steps == 7 and cfg.augment.strong is False
    # keyword maps merge across layers: preset patch_size/num_heads, file depth over preset, flag embed_dim
    assert cfg.model.model_kwargs == {"patch_size": 8, "depth": 2, "embed_dim": 96, "num_heads": 3}
    assert cfg.optim.betas == [0.9, 0.98]  # untouched default
    assert cfg.peak_lr() == pytest.approx(5e-4 * 8 * 4 / 256 / 2)
    assert cli.parse_config(["--preset", "cpu_small", *GEN, "--lr", "0.01"])[0].peak_lr() == 0.01


def test_written_config_round_trips(tmp_path):
    cfg = build_config("cpu_small", overrides={"data": {"generators": ["tcp://127.0.0.1:1"]}, "schedule": {"steps": 9, "warmup_steps": 1}})
    path = write_config(cfg, tmp_path / "run")
    data = load_yaml(path)
    assert data["resolved"]["total_steps"] == 9 and data["resolved"]["peak_lr"] == pytest.approx(cfg.peak_lr())
    assert from_dict(data) == cfg
    again, _ = cli.parse_config(["--config", str(path)])
    assert again == cfg


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--lr", "-1"], "optim.lr = -1.0"),
        (["--lr", "inf"], "optim.lr = inf"),
        (["--min-fresh", "1.5"], "replay.min_fresh = 1.5"),
        (["--steps", "5", "--epochs", "2"], "schedule.epochs"),
        (["--warmup-steps", "500"], "schedule.warmup_steps = 500"),
        (["--replay-capacity", "10", "--replay-gib", "1"], "replay.capacity_gib"),
        (["--betas", "0.9", "1.5"], "optim.betas"),
        (["--generators", "localhost:5555"], "data.generators = 'localhost:5555'"),
        (["--source", "offline"], "data.data"),
        (["--samples-per-insert", "0"], "replay.samples_per_insert = 0.0"),
        (["--samples-per-insert", "-2"], "replay.samples_per_insert = -2.0"),
        (["--samples-per-insert", "2", "--spi-tolerance", "-1"], "replay.spi_tolerance = -1.0"),
        (["--spi-tolerance", "nan"], "replay.spi_tolerance = nan"),
        (["--feedback-every", "-1"], "data.feedback_every = -1"),
        (["--feedback-decay", "1"], "data.feedback_decay = 1.0"),
        (["--fetch-ahead", "0"], "data.fetch_ahead = 0"),
    ],
)
def test_bad_values_name_field_and_value(argv, needle):
    with pytest.raises(ConfigError) as err:
        cli.parse_config(["--preset", "cpu_small", *GEN, *argv])
    assert needle in str(err.value)


def test_yaml_errors_name_file_and_field(tmp_path):
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate.*bad_key\.yaml"):
        build_config(config_file=str(bad_key))
    bad_type = tmp_path / "bad_type.yaml"
    bad_type.write_text("data:\n  captions_per_step: many\n")
    with pytest.raises(ConfigError, match=r"data\.captions_per_step = 'many'.*bad_type\.yaml.*expected int"):
        build_config(config_file=str(bad_type))
    bad_group = tmp_path / "bad_group.yaml"
    bad_group.write_text("optimizer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config group 'optimizer'"):
        build_config(config_file=str(bad_group))
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        build_config(preset="nope")
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(config_file=str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="run length is not set"):
        TrainConfig(data=TrainConfig().data.__class__(generators=["tcp://a:1"])).validate()


def test_rate_contract_and_feedback_flags_reach_the_config_and_config_yaml(tmp_path, capsys):
    default, _ = cli.parse_config(["--preset", "cpu_small", *GEN])
    assert default.replay.samples_per_insert is None and default.replay.spi_tolerance == 0.0  # no contract
    assert default.data.feedback_every == 10 and default.data.feedback_decay == 0.8
    cfg, _ = cli.parse_config(["--preset", "cpu_small", *GEN, "--samples-per-insert", "4", "--spi-tolerance", "32",
                               "--feedback-every", "0", "--feedback-decay", "0.5"])
    assert (cfg.replay.samples_per_insert, cfg.replay.spi_tolerance) == (4.0, 32.0)
    assert (cfg.data.feedback_every, cfg.data.feedback_decay) == (0, 0.5)
    data = load_yaml(write_config(cfg, tmp_path / "run"))
    assert data["replay"]["samples_per_insert"] == 4.0 and data["replay"]["spi_tolerance"] == 32.0
    assert data["data"]["feedback_every"] == 0 and data["data"]["feedback_decay"] == 0.5
    assert from_dict(data) == cfg
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--samples-per-insert R", "--spi-tolerance E", "--feedback-every STEPS", "--feedback-decay"):
        assert flag in text


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    assert cli.main(["--preset", "cpu_small", *GEN, "--max-reuse", "0"]) == 2
    assert "replay.max_reuse = 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse: unknown choice
        cli.main(["--preset", "cpu_small", *GEN, "--precision", "fp8"])
    assert exc.value.code == 2


def test_print_config(capsys):
    assert cli.main(["--preset", "cpu_small", *GEN, "--steps", "3", "--warmup-steps", "0", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["schedule"]["steps"] == 3 and printed["resolved"]["total_steps"] == 3


def test_demo_preset_holds_the_demo_trainer_settings():
    from experiments.demo_preset import demo_trainer_flags  # the preset and the grammar's cell words

    cfg, _ = cli.parse_config([*demo_trainer_flags(), *GEN])
    assert (cfg.model.name, cfg.model.model_kwargs) == ("small_cnn", {})
    assert (cfg.data.captions_per_step, cfg.data.draw_per_caption, cfg.model.img_size) == (16, 4, 64)
    # caption cells that differ only in shape or texture, and the weak augmentation (docs/recipe.md, "The demo preset")
    assert cfg.replay.hard_fraction == 1.0 and set(cfg.replay.cell_words) >= {"circle", "stripes"}
    assert cfg.augment.strong is False


def test_schedule_values_at_known_steps():
    kw = dict(peak_lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.0)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(4, **kw) == pytest.approx(0.5)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_at(35, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_at(110, **kw) == pytest.approx(0.0) and lr_at(500, **kw) == pytest.approx(0.0)
    assert lr_at(60, peak_lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.2) == pytest.approx(0.6)
    assert lr_at(0, peak_lr=3.0, total_steps=5) == pytest.approx(3.0)  # no warmup
    with pytest.raises(ValueError):
        lr_at(-1, **kw)


def test_old_count_names_still_work_with_a_warning(tmp_path, capsys):
    from trainer.cli import warn_deprecated_flags

    cfg, _ = cli.parse_config(["--batch-captions", "8", "--images-per-caption", "3", "--steps", "2",
                               "--generators", "tcp://127.0.0.1:5555"])
    assert (cfg.data.captions_per_step, cfg.data.draw_per_caption) == (8, 3)
    warn_deprecated_flags(["--batch-captions=8"])
    assert "--batch-captions is deprecated; use --captions-per-step" in capsys.readouterr().err
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  batch_captions: 12\n  images_per_caption: 2\n  generators: [tcp://127.0.0.1:5555]\n"
                   "schedule:\n  steps: 2\n")
    with pytest.warns(UserWarning, match="data.batch_captions .* is deprecated; use data.captions_per_step"):
        cfg = build_config(config_file=str(old))
    assert (cfg.data.captions_per_step, cfg.data.draw_per_caption) == (12, 2)


def test_monitor_subsets_per_split_and_the_old_single_cap(tmp_path):
    """``--monitor-max-train`` / ``--monitor-max-val`` set each split's cap; ``--monitor-max-images`` sets
    both unless one is given on its own; a config's old ``monitor.max_images`` loads as both, with a warning."""
    base = ["--steps", "2", "--generators", "tcp://127.0.0.1:5555"]
    default = cli.parse_config(base)[0].monitor
    assert (default.max_train, default.max_val) == (256, 64)
    cfg, _ = cli.parse_config([*base, "--monitor-max-train", "300", "--monitor-max-val", "40"])
    assert (cfg.monitor.max_train, cfg.monitor.max_val) == (300, 40)
    cfg, _ = cli.parse_config([*base, "--monitor-max-images", "100"])
    assert (cfg.monitor.max_train, cfg.monitor.max_val) == (100, 100)
    cfg, _ = cli.parse_config([*base, "--monitor-max-val", "8", "--monitor-max-images", "100"])
    assert (cfg.monitor.max_train, cfg.monitor.max_val) == (100, 8)
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  generators: [tcp://127.0.0.1:5555]\nschedule:\n  steps: 2\nmonitor:\n  max_images: 96\n")
    with pytest.warns(UserWarning, match="monitor.max_images .* is deprecated; use monitor.max_train and monitor.max_val"):
        cfg = build_config(config_file=str(old))
    assert (cfg.monitor.max_train, cfg.monitor.max_val) == (96, 96)
    for flag in ("--monitor-max-train", "--monitor-max-val"):
        with pytest.raises(ConfigError, match=f"monitor.max_{flag.split('-')[-1]}.*must be an integer >= 0"):
            cli.parse_config([*base, flag, "-1"])
