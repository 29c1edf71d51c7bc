"""The official StableRep recipe (google-research/syn-rep-learn, StableRep/) where it changes results.

Each test states the official behaviour as a fact and checks ours against it.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from trainer import cli
from trainer.config import build_config

GEN = ["--generators", "tcp://127.0.0.1:5555"]


# ----- 1. learning-rate rule: lr = blr * images_per_step / 256 * num_crop / 2 ------------------------------
def test_paper_preset_peak_lr_is_the_official_value():
    # official README command: 43 captions x 32 GPUs, n_img 6, blr 2e-4, num_crop 1 -> 3.225e-3
    cfg, _ = cli.parse_config(["--preset", "paper_vitb16_cc12m_1x", *GEN])
    assert cfg.peak_lr() == pytest.approx(2e-4 * 43 * 32 * 6 / 256 * 1 / 2)
    assert cfg.peak_lr() == pytest.approx(3.225e-3)


def test_crops_per_image_scales_lr_and_images():
    cfg, _ = cli.parse_config(["--preset", "paper_vitb16_cc12m_1x", *GEN, "--crops-per-image", "2",
                               "--draw-per-caption", "1"])
    assert cfg.augment.crops_per_image == 2
    assert cfg.images_per_step() == 1376 * 1 * 2
    assert cfg.peak_lr() == pytest.approx(2e-4 * 1376 / 256 * 2 / 2)


def test_print_config_shows_resolved_peak_lr():
    out = subprocess.run([sys.executable, "-m", "trainer.cli", "--preset", "paper_vitb16_cc12m_1x", *GEN,
                          "--print-config"], capture_output=True, text=True, check=True).stdout
    resolved = yaml.safe_load(out)["resolved"]
    assert resolved["peak_lr"] == pytest.approx(3.225e-3)


def test_bad_crops_per_image_is_named():
    with pytest.raises(ValueError, match="augment.crops_per_image"):
        build_config("cpu_small", overrides={"data": {"generators": GEN[1:]}, "augment": {"crops_per_image": 0}})


# ----- 3. projection head per view chunk, SyncBatchNorm ---------------------------------------------------
def _tiny_model(**kw):
    from trainer.models.stablerep_model import build_model

    return build_model("vit_tiny_patch16_224", img_size=32, model_kwargs={"patch_size": 8, "depth": 1},
                       head_hidden=16, head_out=8, **kw)


def test_head_runs_once_per_view_chunk_with_its_own_batch_statistics():
    import torch

    torch.manual_seed(0)
    model = _tiny_model(head_per_view=True).train()
    groups, views = 5, 3
    features = torch.randn(groups * views, model.num_features)
    out = model.project(features, views)
    # official: chunk j = the images at index j of every group, the head (BN in train mode) on each chunk
    grouped = features.view(groups, views, -1)
    expected = torch.stack([model.head(grouped[:, j]) for j in range(views)], dim=1).flatten(0, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)  # one call per layer: rounding only
    # and it differs from one BN over all 15 rows
    assert not torch.allclose(out, model.head(features))
    old = _tiny_model(head_per_view=False).train()
    old.load_state_dict(model.state_dict())
    assert torch.allclose(old.project(features, views), model.head(features))


def test_paper_preset_uses_per_view_head_and_sync_bn():
    import torch

    cfg, _ = cli.parse_config(["--preset", "paper_vitb16_cc12m_1x", *GEN])
    assert cfg.model.head_per_view and cfg.model.sync_bn
    assert cfg.resolved_dict()["resolved"]["head_batchnorm"] == "per view chunk, synchronized across processes"
    model = _tiny_model(head_per_view=True, sync_bn=True)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.head.modules())
    old, _ = cli.parse_config(["--preset", "paper_vitb16_cc12m_1x", *GEN, "--head-all-views", "--no-sync-bn"])
    assert not old.model.head_per_view and not old.model.sync_bn


# ----- 4. logit scale clamped to [0, ln 100] after every optimizer step -----------------------------------
def test_clamp_logit_scale_bounds_the_parameter():
    import math

    import torch

    model = _tiny_model(text={"width": 32, "heads": 2, "layers": 1, "embed_dim": 16, "context_length": 16})
    for value, expected in ((7.0, math.log(100)), (-3.0, 0.0), (2.0, 2.0)):
        with torch.no_grad():
            model.logit_scale.fill_(value)
        model.clamp_logit_scale_()
        assert model.logit_scale.item() == pytest.approx(expected)


def test_training_clamps_logit_scale_after_each_step(tmp_path):
    import math

    from safetensors.torch import load_file

    from tests.train_helpers import write_shards
    from trainer.loop import train

    shards = write_shards(tmp_path / "shards", num_captions=8, m=2, size=32, groups_per_shard=8)
    cfg = build_config("cpu_small", overrides={
        "model": {"img_size": 32, "model_kwargs": {"patch_size": 8, "depth": 1, "embed_dim": 192, "num_heads": 3},
                  "head_hidden": 16, "head_out": 8,
                  "text": {"width": 32, "heads": 2, "layers": 1, "embed_dim": 16, "context_length": 16}},
        "method": {"name": "clip"},
        "augment": {"strong": False},
        "data": {"source": "offline", "data": [str(shards)], "captions_per_step": 8, "draw_per_caption": 1,
                 "num_workers": 0},
        "optim": {"lr": 50.0},  # one AdamW step moves the scale by about 50: far outside [0, ln 100]
        "schedule": {"steps": 2, "warmup_steps": 0},
        "run": {"output": str(tmp_path / "run"), "progress": False, "log_with": []},
    })
    summary = train(cfg)
    state = load_file(str(next((tmp_path / "run" / "checkpoints" / "last").glob("model*.safetensors"))))
    scale = float(state["logit_scale"])
    assert summary["steps"] == 2
    assert 0.0 <= scale <= math.log(100) + 1e-6
    assert scale in (pytest.approx(0.0), pytest.approx(math.log(100)))


# ----- 5. downsample augmentation: p 0.05 per image, to 64 or 128 px and back -------------------------------
def _uint8_images(n, side, seed=0):
    import torch

    return torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_down_up_resize_probability_and_sides():
    import torch

    from trainer.augment import GPUAugment

    aug = GPUAugment(size=32, down_res=(64, 128), down_prob=0.05)
    params = aug.sample_params(20000, 256, 256, generator=torch.Generator().manual_seed(0))
    chosen = params.down[params.down >= 0]
    assert 0.04 < chosen.numel() / 20000 < 0.06          # official downsample_prob 0.05
    assert 0.4 < (chosen == 0).float().mean() < 0.6      # 64 and 128 equally likely (no down_prob given)
    # a chosen image is the input shrunk to the side and resized back (shorter side, aspect kept)
    import torch.nn.functional as F

    from trainer.augment import down_up_where

    x = _uint8_images(3, 256).permute(0, 3, 1, 2).float()
    out = down_up_where(x, torch.tensor([-1, 0, 1]), (64, 128))
    assert torch.equal(out[0], x[0])
    for i, side in ((1, 64), (2, 128)):
        ref = F.interpolate(F.interpolate(x[i:i + 1], size=(side, side), mode="bilinear", antialias=True),
                            size=(256, 256), mode="bilinear")
        torch.testing.assert_close(out[i:i + 1], ref)


def test_paper_preset_uses_the_official_downsample():
    cfg, _ = cli.parse_config(["--preset", "paper_vitb16_cc12m_1x", *GEN])
    assert cfg.augment.down_res == [64, 128] and cfg.augment.down_prob == 0.05 and cfg.augment.downsample is None
    assert "p=0.05" in cfg.resolved_dict()["resolved"]["augment"]["down_up"]


# ----- 6. weak augmentation, crops per image, ColorJitter order -----------------------------------------
def test_weak_augmentation_is_crop_scale_half_without_flip():
    import torch

    from trainer.augment import GPUAugment

    cfg, _ = cli.parse_config(["--preset", "cpu_small", *GEN, "--weak-aug"])
    cfg.augment.scale_min = None  # the preset pins its own; the weak default is the official 0.5
    assert cfg.crop_scale_min() == 0.5
    aug = GPUAugment(size=32, strong=False, scale=(cfg.crop_scale_min(), 1.0))
    params = aug.sample_params(4000, 64, 64, generator=torch.Generator().manual_seed(0))
    assert not params.flip.any()
    area = params.crop[:, 2] * params.crop[:, 3] / (64 * 64)
    assert area.min() >= 0.5 - 0.03 and area.max() <= 1.0
    assert params.jitter_order is None and params.gray.sum() == 0 and (params.blur_sigma == 0).all()


def test_color_jitter_order_is_random_per_image_and_matches_torchvision():
    import torch
    import torchvision.transforms.v2.functional as TF

    from trainer.augment import AugmentParams, GPUAugment, color_jitter

    aug = GPUAugment(size=32)
    params = aug.sample_params(5000, 40, 40, generator=torch.Generator().manual_seed(0))
    orders = {tuple(o) for o in params.jitter_order.tolist()}
    assert len(orders) == 24                              # every permutation occurs
    n = 4
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]])
    b, c, s, h = torch.tensor([1.3, 0.7, 1.1, 0.9]), torch.tensor([0.8, 1.2, 1.3, 0.7]), \
        torch.tensor([1.2, 0.6, 0.9, 1.4]), torch.tensor([0.05, -0.08, 0.1, -0.02])
    p = AugmentParams(crop=torch.zeros(n, 4), flip=torch.zeros(n, dtype=torch.bool), brightness=b, contrast=c,
                      saturation=s, hue=h, gray=torch.zeros(n, dtype=torch.bool), blur_sigma=torch.zeros(n),
                      jitter_order=order)
    out = color_jitter(x.clone(), p)
    ops = [lambda im, i: TF.adjust_brightness(im, b[i].item()), lambda im, i: TF.adjust_contrast(im, c[i].item()),
           lambda im, i: TF.adjust_saturation(im, s[i].item()), lambda im, i: TF.adjust_hue(im, h[i].item())]
    for i in range(n):
        ref = x[i]
        for o in order[i].tolist():                       # torchvision: ops in the drawn order
            ref = ops[o](ref, i)
        torch.testing.assert_close(out[i], ref, rtol=1e-4, atol=1e-4)


def test_crops_per_image_gives_every_image_several_views():
    import torch

    from trainer.augment import GPUAugment
    from trainer.data.batch import Batch
    from trainer.objectives.methods import build_method

    seen = {}

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(3, 4)

        def forward(self, x, views=1):
            seen["shape"], seen["views"] = tuple(x.shape), views
            return self.w(x.mean(dim=(2, 3)))

    g, n = 3, 2
    images = _uint8_images(g * n, 16).view(g, n, 16, 16, 3)
    batch = Batch(images=images, caption_ids=torch.tensor([10, 11, 12]), captions=["a", "b", "c"])
    aug = GPUAugment(size=8, strong=False, crops_per_image=2)
    loss, metrics = build_method("stablerep")(Recorder(), batch, aug)
    assert seen["shape"] == (g * n * 2, 3, 8, 8) and seen["views"] == n * 2 and metrics["images"] == 12
    assert metrics["positives_per_anchor"].item() == n * 2 - 1
    # official SimCLR: one image per caption, two crops, positives = the other crop
    loss, metrics = build_method("simclr")(Recorder(), batch, GPUAugment(size=8, strong=False))
    assert seen["shape"] == (g * 2, 3, 8, 8) and metrics["positives_per_anchor"].item() == 1


# ----- 2. caption ids unique over every input of a run, stable across resumes ----------------------------
def _official_csv(root, captions, side=8):
    import io

    from PIL import Image

    rows = [f"{r:06d}.png" for r in range(len(captions))]
    root.mkdir(parents=True)
    (root / "data.csv").write_text("".join(f"{p},{c}\n" for p, c in zip(rows, captions)))
    for seed in range(2):
        for r, relative in enumerate(rows):
            path = root / f"seed{seed}" / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            Image.new("RGB", (side, side), (r * 10, seed * 50, 0)).save(buf, format="PNG")
            path.write_bytes(buf.getvalue())
    return root / "data.csv"


def _all_ids(source, batches):
    return [(c, t) for _ in range(batches) for b in [source.next_batch()] for c, t in zip(b.caption_ids.tolist(), b.captions)]


def test_two_csvs_get_distinct_caption_ids_and_resume_keeps_them(tmp_path):
    from trainer.data.sources.offline import OfflineSource

    a = _official_csv(tmp_path / "a", ["a dog", "a cat", "a cow"])
    b = _official_csv(tmp_path / "b", ["a car", "a bus", "a van"])
    source = OfflineSource([str(a), str(b)], captions_per_rank=6, draw_per_caption=2, num_workers=0, image_size=8)
    pairs = _all_ids(source, 1)
    ids = {c for c, _ in pairs}
    assert len(ids) == 6                                  # the official layout gave [0, 1, 2, 0, 1, 2]
    assert len({t for _, t in pairs}) == 6
    again = OfflineSource([str(a), str(b)], captions_per_rank=6, draw_per_caption=2, num_workers=0, image_size=8)
    assert dict(_all_ids(again, 1)) == dict(pairs)        # same ids in a new process / after a resume
    # rank 1 of 2 names every caption as rank 0 does
    ranks = [OfflineSource([str(a), str(b)], captions_per_rank=3, draw_per_caption=1, num_workers=0, image_size=8,
                           rank=r, world_size=2, rows_per_part=1) for r in range(2)]
    both = [p for s in ranks for p in _all_ids(s, 1)]
    assert dict(both) == dict(pairs) and len({c for c, _ in both}) == 6
    # the same CSV twice is the same captions: the same ids
    twice = OfflineSource([str(a), str(a)], captions_per_rank=6, draw_per_caption=1, num_workers=0, image_size=8)
    assert sorted(c for c, _ in _all_ids(twice, 1)) == [0, 0, 1, 1, 2, 2]


def test_shard_sets_with_different_captions_get_distinct_ids(tmp_path):
    from generator_service.shards import ShardWriter
    from tests.train_helpers import generator_config, make_group, write_shards
    from trainer.data.sources.offline import OfflineSource

    one = write_shards(tmp_path / "one", num_captions=4, m=2, size=8, groups_per_shard=4)
    single = OfflineSource([str(one)], captions_per_rank=4, draw_per_caption=1, num_workers=0)
    assert sorted(c for c, _ in _all_ids(single, 1)) == [0, 1, 2, 3]   # one input: its own ids
    for name, digest in (("two", "captions-b"), ("three", "captions-c")):
        with ShardWriter(tmp_path / name, generator_config(2, 8), shard_size=4, run={"captions_digest": digest}) as w:
            for caption_id in range(4):
                w.write(make_group(caption_id, 2, 8))
    both = OfflineSource([str(tmp_path / "two"), str(tmp_path / "three")], captions_per_rank=8, draw_per_caption=1,
                         num_workers=0)
    assert len({c for c, _ in _all_ids(both, 1)}) == 8    # same local ids 0..3, other caption files


def test_online_ids_are_namespaced_by_generator_fingerprint():
    from trainer.data.sources.caption_ids import namespaced_caption_id, needs_namespacing

    assert not needs_namespacing(["fp-a", "fp-a"]) and needs_namespacing(["fp-a", "fp-b"])
    a = [namespaced_caption_id("generator:fp-a", i) for i in range(1000)]
    b = [namespaced_caption_id("generator:fp-b", i) for i in range(1000)]
    assert len(set(a) | set(b)) == 2000 and all(0 <= x < 2**63 for x in a + b)
    assert a == [namespaced_caption_id("generator:fp-a", i) for i in range(1000)]


# ----- 7. offline shuffle: global, per sample, every epoch; split like DistributedSampler --------------------
def test_offline_shuffle_is_global_per_sample_and_resumes_exactly(tmp_path):
    from trainer.data.sources.offline import OfflineSource

    csv_path = _official_csv(tmp_path / "big", [f"caption {i}" for i in range(1024)], side=4)

    def make(**kw):
        args = dict(captions_per_rank=16, draw_per_caption=1, num_workers=0, image_size=4, seed=3)
        return OfflineSource([str(csv_path)], **{**args, **kw})

    source = make()
    first = source.next_batch().caption_ids.tolist()
    assert len({row // 256 for row in first}) >= 3   # blocks of 256 rows gave 1 block per batch
    state = source.state_dict()
    second = source.next_batch().caption_ids.tolist()
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.next_batch().caption_ids.tolist() == second   # exact resume
    # a new epoch is a new permutation
    epoch0 = [c for _ in range(64) for c in make().next_batch().caption_ids.tolist()][:16]
    source = make()
    for _ in range(64):
        source.next_batch()
    epoch1 = source.next_batch().caption_ids.tolist()
    assert source.stats()["epochs_completed"] == 1 and epoch1 != epoch0


def test_fewer_shards_than_ranks_no_rank_starves(tmp_path):
    from tests.train_helpers import write_shards
    from trainer.data.sources.offline import OfflineSource

    one_shard = write_shards(tmp_path / "one", num_captions=10, m=1, size=8, groups_per_shard=10)
    per_rank, epoch0 = [], []
    for rank in range(4):
        source = OfflineSource([str(one_shard)], captions_per_rank=3, draw_per_caption=1, num_workers=0, rank=rank,
                               world_size=4)
        ids = source.next_batch().caption_ids.tolist()
        per_rank.append(ids)
        epoch0 += [c for c, epoch in zip(ids, source.batch_epochs) if epoch == 0]
    # Every rank gets a whole batch. Unlike DistributedSampler (which pads 10 samples to 12 by repeating
    # two), the epochs form one stream: the 10 groups of epoch 0 are read once each over the 4 ranks, and
    # ranks 2 and 3 complete their batch from epoch 1.
    assert all(len(ids) == 3 for ids in per_rank)
    assert sorted(epoch0) == list(range(10))


# ----- 8. official folder names: an explicit folder list with any names ---------------------------------
def test_official_folder_list_with_any_names(tmp_path):
    import io

    from PIL import Image

    from trainer.loop import build_source

    (tmp_path / "captions.csv").write_text("000000.png,a red cube\n000001.png,a blue ball\n")
    folders = [tmp_path / "gen" / f"ddim_2.0_seed_{s}" for s in range(3)]
    for s, folder in enumerate(folders):
        folder.mkdir(parents=True)
        for r in range(2):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (r * 100, s * 60, 0)).save(buf, format="PNG")
            (folder / f"{r:06d}.png").write_bytes(buf.getvalue())
    cfg, _ = cli.parse_config(["--preset", "cpu_small", "--source", "offline", "--data", str(tmp_path / "captions.csv"),
                               "--folder-list", *map(str, folders), "--captions-per-step", "2",
                               "--draw-per-caption", "3", "--image-size", "8", "--num-workers", "0", "--steps", "1",
                               "--warmup-steps", "0"])
    assert cfg.data.folders == [str(f) for f in folders]
    source = build_source(cfg, device="cpu", rank=0, world_size=1, local_captions=2)
    batch = source.next_batch()
    for g, row in enumerate(batch.caption_ids.tolist()):
        # every folder contributed its image of the row: green channel 0, 60, 120
        assert sorted(batch.images[g, :, 0, 0, 1].tolist()) == [0, 60, 120]
        assert batch.captions[g] == ["a red cube", "a blue ball"][row]


# ----- 9. text tower: CLIP BPE tokenizer, 512 x 8 heads x 12 layers, linear or mlp projection -------------
def test_default_text_tower_is_the_official_clip_one():
    from trainer.models.text_tower import TextConfig, TextTower

    cfg = TextConfig()
    assert (cfg.width, cfg.heads, cfg.layers, cfg.context_length, cfg.tokenizer) == (512, 8, 12, 77, "clip")
    small = TextTower(TextConfig(width=32, heads=2, layers=1, embed_dim=16))  # default tokenizer, tiny tower
    assert small.tokenizer.vocab_size == 49408
    tokens = small.tokenize(["a photo of a cat", "x " * 200])
    assert tokens.shape == (2, 77)
    assert tokens[0, 0] == 49406 and tokens[1, -1] == 49407        # start token; truncation keeps the end token
    assert small(tokens).shape == (2, 16)


def test_mlp_projection_for_image_and_text():
    import torch

    from trainer.models.text_tower import TextConfig

    assert TextConfig().mlp_out == 256  # official: the mlp projection outputs ssl_emb_dim = 256
    text = {"width": 32, "heads": 2, "layers": 1, "embed_dim": 16, "context_length": 16, "projection": "mlp",
            "mlp_hidden": 24, "mlp_out": 12, "tokenizer": "bytes"}
    model = _tiny_model(text=text).train()
    for projection in (model.image_projection, model.text.projection):
        linears = [m for m in projection.modules() if isinstance(m, torch.nn.Linear)]
        assert [m.out_features for m in linears] == [24, 24, 12]  # mlp_out, not the linear embed_dim
        assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in projection.modules()) == 2
    out = model(torch.randn(4, 3, 32, 32), model.tokenize(["a", "b", "c", "d"]))
    assert out["image_embed"].shape == (4, 12) and out["text_embed"].shape == (4, 12)
    with pytest.raises(ValueError, match="projection"):
        _tiny_model(text={**text, "projection": "conv"})


# ----- 11. official released checkpoints: {'model': {'visual.<timm ViT keys>', 'image_mlp.*', ...}, 'args'} --
def test_eval_loads_a_checkpoint_in_the_official_layout(tmp_path):
    import argparse

    import timm
    import torch

    from trainer.eval.backbones import load_eval_backbone

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", num_classes=0, depth=1)  # official: vit_{size}_patch16_224
    state = {f"visual.{k}": v for k, v in vit.state_dict().items()}
    state["image_mlp.layer1.weight"] = torch.randn(8, 384)                  # projection head: dropped
    state["image_mlp.bn1.running_mean"] = torch.zeros(8)
    checkpoint = {"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 14,
                  "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="small", n_img=6)}
    path = tmp_path / "epoch_last.pth"
    torch.save(checkpoint, path)
    backbone = load_eval_backbone(path)
    assert backbone.name == "vit_small_patch16_224" and backbone.num_features == 384
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(backbone.features(x), vit.eval()(x))
    # a file without the layout is named in the error
    torch.save({"weights": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth"):
        load_eval_backbone(tmp_path / "other.pth")


# ----- 12. fp16 always goes with a gradient scaler ------------------------------------------------------
def test_fp16_uses_a_gradient_scaler_in_the_trainer_bench():
    import torch

    from benchmarks.trainer_bench import grad_scaler, run_trainer_bench

    cpu = torch.device("cpu")
    assert grad_scaler(cpu, "fp16").is_enabled() and not grad_scaler(cpu, "bf16").is_enabled()
    results = run_trainer_bench(
        model="vit_tiny_patch16_224", img_size=32, model_kwargs={"patch_size": 8, "depth": 1}, head=(32, 16, 2),
        captions_per_step=4, draw_per_caption=3, stored_size=40, precision="fp16", steps=1, warmup=1,
        augment_batch=0, device="cpu",
    )
    assert results["grad_scaler"] is True and results["fed_step"]["images_per_s"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="Accelerate's fp16 mode needs CUDA")
def test_trainer_fp16_uses_accelerates_gradient_scaler():
    from accelerate import Accelerator

    from trainer.launch import fresh_accelerator_state

    fresh_accelerator_state()  # earlier tests in this process trained at other precisions
    accelerator = Accelerator(mixed_precision="fp16")
    assert accelerator.scaler is not None  # accelerator.backward scales, the prepared optimizer unscales
