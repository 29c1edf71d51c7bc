"""More of the official StableRep recipe (google-research/syn-rep-learn, StableRep/): the baselines' batch
and lr, weak augmentation, the reported probe number, weight decay, the epoch, probe preprocessing and the
text tower. Each test states the official fact and checks ours against it.
"""
from __future__ import annotations

import io
import tarfile
import warnings

import pytest
import torch
import yaml

from trainer import cli
from trainer.config import build_config

GEN = ["--generators", "tcp://127.0.0.1:5555"]
PAPER = ["--preset", "paper_vitb16_cc12m_1x", *GEN]


def _printed(argv: list[str], capsys) -> dict:
    assert cli.main([*argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


# ----- baselines: official SimCLR --n_img 1 --num_crop 2, CLIP --n_img 1 (one crop); lr = blr x B x n_img / 256 x num_crop / 2
@pytest.mark.parametrize("method, draw, crops, lr, images", [
    ("simclr", 1, 2, 2e-4 * 1376 * 1 / 256 * 2 / 2, 1376 * 2),     # 1.075e-3
    ("clip", 1, 1, 2e-4 * 1376 * 1 / 256 * 1 / 2, 1376),           # 5.375e-4
    ("stablerep", 6, 1, 2e-4 * 1376 * 6 / 256 * 1 / 2, 1376 * 6),  # 3.225e-3
    ("stablerep+", 6, 1, 2e-4 * 1376 * 6 / 256 * 1 / 2, 1376 * 6),
])
def test_paper_preset_baselines_resolve_to_the_official_batch_and_lr(method, draw, crops, lr, images, capsys):
    printed = _printed([*PAPER, "--method", method], capsys)
    assert printed["data"]["draw_per_caption"] == draw
    assert printed["augment"]["crops_per_image"] == crops
    assert printed["resolved"]["peak_lr"] == pytest.approx(lr, rel=1e-12)
    assert printed["resolved"]["images_per_step"] == images
    assert printed["resolved"]["augment"]["crops_per_image"] == crops


def test_printed_values_are_the_issue_numbers(capsys):
    assert _printed([*PAPER, "--method", "simclr"], capsys)["resolved"]["peak_lr"] == pytest.approx(0.001075)
    assert _printed([*PAPER, "--method", "clip"], capsys)["resolved"]["peak_lr"] == pytest.approx(0.0005375)


def test_simclr_lr_counts_the_two_crops_it_forces():
    """--draw-per-caption 1 alone: SimCLR still trains on 2 crops, so the lr is not halved."""
    cfg, _ = cli.parse_config([*PAPER, "--method", "simclr", "--draw-per-caption", "1"])
    assert cfg.augment.crops_per_image == 2 and cfg.peak_lr() == pytest.approx(1.075e-3)
    with pytest.warns(UserWarning, match=r"augment.crops_per_image = 1: the official simclr recipe uses 2"):
        cfg, _ = cli.parse_config([*PAPER, "--method", "simclr", "--crops-per-image", "1"])
    assert cfg.views_in_loss() == (1, 2) and cfg.peak_lr() == pytest.approx(1.075e-3)
    assert cfg.images_per_step() == 1376 * 2


def test_explicit_contradicting_value_stays_with_a_warning_naming_the_official_one(tmp_path):
    with pytest.warns(UserWarning, match=r"data.draw_per_caption = 6: the official simclr recipe uses 1"):
        cfg, _ = cli.parse_config([*PAPER, "--method", "simclr", "--draw-per-caption", "6"])
    assert cfg.data.draw_per_caption == 6
    assert cfg.views_in_loss() == (1, 2)  # the method trains on the first image of each caption only
    assert cfg.peak_lr() == pytest.approx(1.075e-3)
    # a config file is the user's choice too; the preset is not
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump({"data": {"draw_per_caption": 3}}))
    with pytest.warns(UserWarning, match="the official clip recipe uses 1"):
        cfg, _ = cli.parse_config([*PAPER, "--config", str(own), "--method", "clip"])
    assert cfg.data.draw_per_caption == 3 and cfg.peak_lr() == pytest.approx(5.375e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the official values given explicitly: no warning
        cfg, _ = cli.parse_config([*PAPER, "--method", "simclr", "--draw-per-caption", "1", "--num-crop", "2"])
    assert cfg.peak_lr() == pytest.approx(1.075e-3)


def test_method_classes_declare_the_official_views():
    from trainer.objectives.methods import METHODS

    assert (METHODS.get("simclr").official.draw_per_caption, METHODS.get("simclr").official.crops_per_image) == (1, 2)
    assert (METHODS.get("clip").official.draw_per_caption, METHODS.get("clip").official.crops_per_image) == (1, 1)
    for name in ("stablerep", "stablerep+"):  # what the preset says
        assert (METHODS.get(name).official.draw_per_caption, METHODS.get(name).official.crops_per_image) == (None, None)


@pytest.mark.filterwarnings("ignore:config field:UserWarning")  # simclr / clip against their official views
@pytest.mark.parametrize("name, draw, crops", [("simclr", 3, 1), ("clip", 2, 2), ("stablerep", 3, 2),
                                               ("stablerep+", 2, 1)])
def test_images_per_step_is_what_the_method_feeds_its_loss(name, draw, crops):
    """The count the lr rule uses equals the images a training step really puts into the loss."""
    from tests.test_methods import caption_batch, tiny_model
    from trainer.augment import GPUAugment
    from trainer.objectives.methods import build_method

    cfg = build_config(overrides={"method": {"name": name}, "data": {"captions_per_step": 4, "draw_per_caption": draw,
                       "generators": ["tcp://127.0.0.1:1"]}, "augment": {"crops_per_image": crops},
                       "schedule": {"steps": 1}})
    method = build_method(name)
    model = tiny_model(method.needs_text, method.needs_head)
    augment = GPUAugment(size=16, strong=False, scale=(0.6, 1.0), crops_per_image=cfg.augment.crops_per_image)
    _, metrics = method(model, caption_batch(groups=4, per_group=cfg.data.draw_per_caption), augment)
    assert metrics["images"] == cfg.images_per_step()


# ----- weak augmentation: official --weak_aug = RandomResizedCrop(224, scale=(0.5, 1)) only ----------------
def test_weak_aug_over_the_paper_preset_crops_at_half_scale(tmp_path):
    cfg, _ = cli.parse_config([*PAPER, "--weak-aug"])
    assert cfg.crop_scale_min() == 0.5 and cfg.augment_summary()["flip_p"] == 0.0
    assert "scale=(0.5, 1)" in cfg.augment_summary()["crop"]
    cfg, _ = cli.parse_config([*PAPER, "--weak-aug", "--scale-min", "0.3"])
    assert cfg.crop_scale_min() == 0.3
    # a run's saved strong config (scale_min 0.08 written out) fed back with --weak-aug: 0.5 again
    strong, _ = cli.parse_config(PAPER)
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(strong.to_dict()))
    assert strong.crop_scale_min() == 0.08
    assert cli.parse_config(["--config", str(saved), "--weak-aug"])[0].crop_scale_min() == 0.5
    # a config file choosing weak augmentation together with its scale keeps it
    own = tmp_path / "weak.yaml"
    own.write_text(yaml.safe_dump({"augment": {"strong": False, "scale_min": 0.4}}))
    assert cli.parse_config([*PAPER, "--config", str(own)])[0].crop_scale_min() == 0.4
    assert cli.parse_config([*PAPER, "--config", str(own), "--strong-aug"])[0].crop_scale_min() == 0.08


# ----- weight decay: official decays every ndim >= 2 tensor that is not a bias / norm ----------------------
def test_weight_decay_of_embeddings_is_on_by_default_with_a_flag_to_turn_off():
    assert cli.parse_config(PAPER)[0].optim.wd_embeddings is True
    assert cli.parse_config([*PAPER, "--no-wd-embeddings"])[0].optim.wd_embeddings is False
    assert cli.parse_config([*PAPER, "--no-wd-embeddings", "--wd-embeddings"])[0].optim.wd_embeddings is True


# ----- epoch: official len(dataset) // (captions per step), the loader drops the last partial batch ---------
def _official_csv(root, rows: int):
    from PIL import Image

    (root / "seed0").mkdir(parents=True)
    lines = ["path,caption"]
    for r in range(rows):
        Image.new("RGB", (8, 8), (r % 256, 0, 0)).save(root / "seed0" / f"{r:05d}.png")
        lines.append(f"{r:05d}.png,caption {r}")
    (root / "data.csv").write_text("\n".join(lines) + "\n")
    return root / "data.csv"


def test_offline_epoch_is_the_csv_length_over_the_step(tmp_path):
    csv_path = _official_csv(tmp_path / "official", 23)
    argv = ["--preset", "paper_vitb16_cc12m_1x", "--source", "offline", "--data", str(csv_path),
            "--captions-per-step", "4", "--epochs", "3", "--warmup-epochs", "1", "--force"]
    cfg, _ = cli.parse_config(argv)
    assert cfg.data.dataset_captions is None  # the preset's 10M is the online source's nominal epoch
    assert cfg.epoch_captions() == 23 and cfg.steps_per_epoch() == 23 // 4 == 5
    assert cfg.total_steps() == 15 and cfg.warmup_steps() == 5
    resolved = cfg.resolved_dict()["resolved"]
    assert (resolved["epoch_captions"], resolved["steps_per_epoch"]) == (23, 5)
    # given explicitly, the user's count wins
    assert cli.parse_config([*argv, "--dataset-captions", "40"])[0].total_steps() == 3 * 10


def test_offline_epoch_counts_manifest_shards_and_plain_tars(tmp_path):
    from tests.train_helpers import write_shards
    from trainer.data.sources.dataset_size import count_offline_captions

    shards = write_shards(tmp_path / "shards", num_captions=37, m=2, size=8, groups_per_shard=10)
    assert count_offline_captions([str(shards)]) == 37
    cfg = build_config("cpu_small", overrides={"data": {"source": "offline", "data": [str(shards)],
                       "captions_per_step": 8}, "schedule": {"steps": None, "epochs": 2.0, "warmup_steps": 0}})
    assert cfg.total_steps() == 2 * (37 // 8)
    for s in range(2):  # plain image-text WebDataset shards: samples counted by key
        with tarfile.open(tmp_path / f"{s:05d}.tar", "w") as archive:
            for k in range(5 + s):
                for ext, data in (("jpg", b"x"), ("txt", b"a caption"), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{s:05d}{k:04d}.{ext}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    assert count_offline_captions([str(tmp_path / "{00000..00001}.tar")]) == 11


def test_an_epoch_without_a_full_step_is_a_named_error(tmp_path):
    from trainer.config import ConfigError

    csv_path = _official_csv(tmp_path / "official", 3)
    with pytest.raises(ConfigError, match="holds no full step of data.captions_per_step = 4"):
        cli.parse_config(["--preset", "paper_vitb16_cc12m_1x", "--source", "offline", "--data", str(csv_path),
                          "--captions-per-step", "4", "--epochs", "1"])


# ----- linear probe: official main_linear.py reports the best over classifiers (lrs) and evaluations -------
def test_best_evaluation_is_reported_not_the_last():
    from trainer.eval.linear import best_per_head

    history = [{"epoch": 1, "val_top1": [20.0, 5.0], "val_top5": [60.0, 30.0]},
               {"epoch": 2, "train_loss": [0.1, 0.2]},  # not evaluated
               {"epoch": 3, "val_top1": [18.33, 7.0], "val_top5": [61.0, 33.0]}]
    top1, top5, epochs = best_per_head(history, 2)
    assert top1 == [20.0, 7.0] and top5 == [60.0, 33.0] and epochs == [1, 3]


def test_paper_probe_json_reports_best_final_and_history(tmp_path):
    from tests.eval_helpers import write_colour_folder
    from trainer.eval.cli import main

    train = write_colour_folder(tmp_path / "train", 6, seed=1)
    val = write_colour_folder(tmp_path / "val", 4, seed=2)
    out = tmp_path / "paper.json"
    assert main(["linear", "--checkpoint", "timm:vit_tiny_patch16_224", "--model-kwargs", "img_size=32",
                 "patch_size=8", "depth=1", "embed_dim=32", "num_heads=2", "--protocol", "paper", "--epochs", "3",
                 "--eval-every", "1", "--batch-size", "8", "--probe-batch-size", "4", "--lrs", "0.01,3.0",
                 "--train", str(train), "--val", str(val), "--output", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and all("val_top5" in h for h in history)
    best = max(h["val_top1"][i] for h in history for i in range(2))
    assert result["top1"] == best
    i = [0.01, 3.0].index(result["selected"]["base_lr"])
    assert history[result["selected"]["epoch"] - 1]["val_top1"][i] == best
    assert result["final_top1"] == history[-1]["val_top1"][i]


# ----- probe preprocessing: official bilinear resizing, fp32 features ----------------------------------------
def test_probe_views_resize_bilinearly():
    from torchvision.transforms import InterpolationMode, RandomResizedCrop, Resize

    from trainer.eval.backbones import load_eval_backbone
    from trainer.eval.features import eval_transform, train_transform

    backbone = load_eval_backbone("timm:vit_tiny_patch16_224", {"img_size": 32, "depth": 1})
    resizes = [t for t in [*eval_transform(backbone).transforms, *train_transform(backbone).transforms]
               if isinstance(t, (Resize, RandomResizedCrop))]
    assert len(resizes) == 2 and all(t.interpolation == InterpolationMode.BILINEAR for t in resizes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_probe_features_are_fp32_on_cuda(tmp_path):
    from tests.eval_helpers import write_colour_folder
    from trainer.eval.backbones import load_eval_backbone
    from trainer.eval.features import eval_transform, extract_features
    from trainer.eval.imagefolder import ImageFolderDataset

    backbone = load_eval_backbone("timm:vit_tiny_patch16_224", {"img_size": 32, "depth": 1})
    seen = []
    backbone.model.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cuda")))
    data = ImageFolderDataset(write_colour_folder(tmp_path / "data", 3, seed=0), eval_transform(backbone))
    on_gpu = extract_features(backbone, data, torch.device("cuda"), batch_size=4)
    assert seen and not any(seen)
    on_cpu = extract_features(backbone, data, torch.device("cpu"), batch_size=4)
    assert torch.allclose(on_gpu.features, on_cpu.features, atol=1e-4)


# ----- text tower: OpenAI CLIP init (official StableRepMM / CLIP initialize_parameters) ----------------------
def test_text_tower_init_is_openai_clips():
    from trainer.models.text_tower import TextConfig, TextTower

    torch.manual_seed(0)
    width, layers = 128, 4
    tower = TextTower(TextConfig(width=width, layers=layers, heads=4, context_length=77, tokenizer="bytes"))
    hf = tower.transformer
    text = getattr(hf, "text_model", hf)

    def std(t):
        return t.float().std().item()

    attn_std, proj_std, fc_std = width ** -0.5, width ** -0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
    assert std(text.embeddings.token_embedding.weight) == pytest.approx(0.02, rel=0.05)
    assert std(text.embeddings.position_embedding.weight) == pytest.approx(0.01, rel=0.05)
    q = torch.cat([torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                              layer.self_attn.v_proj.weight]) for layer in text.encoder.layers])
    out = torch.cat([layer.self_attn.out_proj.weight for layer in text.encoder.layers])
    fc1 = torch.cat([layer.mlp.fc1.weight for layer in text.encoder.layers])
    fc2 = torch.cat([layer.mlp.fc2.weight for layer in text.encoder.layers])
    assert std(q) == pytest.approx(attn_std, rel=0.05)       # in-proj: width^-0.5
    assert std(out) == pytest.approx(proj_std, rel=0.05)     # out-proj: width^-0.5 (2 layers)^-0.5
    assert std(fc1) == pytest.approx(fc_std, rel=0.05)       # c_fc: (2 width)^-0.5
    assert std(fc2) == pytest.approx(proj_std, rel=0.05)     # c_proj: as the out-proj
    for layer in text.encoder.layers:
        for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.out_proj):
            assert torch.all(linear.bias == 0)  # nn.MultiheadAttention's default biases
        for linear in (layer.mlp.fc1, layer.mlp.fc2):  # nn.Linear's default bias U(-fan_in^-0.5, fan_in^-0.5)
            bound = linear.in_features ** -0.5
            assert linear.bias.abs().max() <= bound and std(linear.bias) == pytest.approx(bound / 3 ** 0.5, rel=0.2)
        for norm in (layer.layer_norm1, layer.layer_norm2):
            assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)


def test_mlp_image_projection_runs_per_view_chunk():
    """Official StableRep+ with vl_projection mlp: the image side runs the mlp on each view chunk."""
    from trainer.models.stablerep_model import build_model

    text = {"width": 32, "heads": 2, "layers": 1, "context_length": 16, "projection": "mlp", "mlp_hidden": 24,
            "tokenizer": "bytes"}
    torch.manual_seed(0)
    model = build_model("vit_tiny_patch16_224", img_size=32, model_kwargs={"patch_size": 8, "depth": 1},
                        head_hidden=16, head_out=8, text=text, head_per_view=True).train()
    groups, views = 4, 3
    features = torch.randn(groups * views, model.num_features)
    grouped = features.view(groups, views, -1)
    expected = torch.stack([model.image_projection(grouped[:, j]) for j in range(views)], dim=1).flatten(0, 1)
    out = model.embed_image(features, views)
    assert out.shape == (12, 256)  # official ssl_emb_dim 256
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)  # one BatchNorm call per layer: rounding only
    assert not torch.allclose(out, model.image_projection(features))
