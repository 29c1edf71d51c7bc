"""Each method runs forward + backward on a tiny model and learns a fixed batch in a few steps."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.augment import GPUAugment
from trainer.data.batch import Batch
from trainer.objectives.methods import METHODS, build_method, unwrap
from trainer.models.stablerep_model import build_model
from trainer.models.text_tower import TextConfig

TINY_VIT = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
TINY_TEXT = TextConfig(width=32, layers=1, heads=2, context_length=24, embed_dim=16, tokenizer="bytes")


def tiny_model(with_text: bool, with_head: bool = True):
    torch.manual_seed(0)
    return build_model("vit_tiny_patch16_224", img_size=16, model_kwargs=TINY_VIT, head_hidden=32,
                       head_out=16, head_layers=3 if with_head else 0, text=TINY_TEXT if with_text else None)


def caption_batch(groups=4, per_group=3, size=20):
    """Each caption's images share a colour and a coarse pattern, with per-image noise."""
    g = torch.Generator().manual_seed(0)
    colour = torch.randint(40, 216, (groups, 1, 1, 1, 3), generator=g).float()
    pattern = torch.randn(groups, 3, 4, 4, generator=g) * 40
    pattern = F.interpolate(pattern, size=(size, size), mode="bilinear").permute(0, 2, 3, 1).unsqueeze(1)
    base = colour + pattern
    noise = torch.randn(groups, per_group, size, size, 3, generator=g) * 20
    images = (base + noise).clamp(0, 255).to(torch.uint8)
    captions = [f"a {c} object" for c in ("red", "green", "blue", "yellow", "white", "black")[:groups]]
    return Batch(images=images, caption_ids=torch.arange(100, 100 + groups), captions=captions)


def test_registry_lists_methods_and_refuses_unknown():
    assert set(METHODS) == {"stablerep", "stablerep+", "simclr", "clip"}
    with pytest.raises(ValueError, match="unknown method 'mae'"):
        build_method("mae")
    with pytest.raises(ValueError, match="bad config for method 'stablerep'"):
        build_method("stablerep", temprature=0.1)


@pytest.mark.parametrize("name", ["stablerep", "stablerep+", "simclr", "clip"])
def test_method_facts_agree_with_the_method(name):
    """``takes_temperature`` says what the constructor takes; ``one_image_per_caption`` what reaches the loss."""
    import inspect

    cls = METHODS.get(name)
    assert cls.takes_temperature == ("temperature" in inspect.signature(cls).parameters)
    assert cls.one_image_per_caption() == (name in ("simclr", "clip"))


@pytest.mark.parametrize("name", ["stablerep", "simclr", "clip", "stablerep+"])
def test_method_learns_fixed_batch(name):
    method = build_method(name)
    model = tiny_model(method.needs_text, method.needs_head)
    augment = GPUAugment(size=16, strong=False, scale=(0.6, 1.0))
    optimizer = torch.optim.AdamW(model.param_groups(0.01), lr=1e-3)
    batch = caption_batch()
    torch.manual_seed(1)
    losses = []
    for step in range(20):
        loss, metrics = method(model, batch, augment)
        assert loss.dim() == 0 and torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:  # every parameter takes part (what DDP without find_unused_parameters needs)
            assert all(p.grad is not None for p in model.parameters())
            assert any(p.grad.abs().sum() > 0 for p in model.backbone.parameters())
            assert all(not v.requires_grad for k, v in metrics.items() if k != "images")
        optimizer.step()
        losses.append(loss.item())
    # the lowest reachable loss is the entropy of the targets: uniform over the 2 other images of a
    # caption (image loss), and for stablerep+ also over the 3 images of a caption (text->image)
    floor = {"stablerep": math.log(2), "stablerep+": math.log(2) + math.log(3) / 2}.get(name, 0.0)
    first, last = sum(losses[:4]) / 4 - floor, sum(losses[-4:]) / 4 - floor
    assert last < 0.5 * first, losses
    if name in ("stablerep", "stablerep+"):
        assert metrics["positives_per_anchor"].item() == 2.0  # 3 images per caption
        assert metrics["images"] == 12
    if name == "simclr":
        assert metrics["positives_per_anchor"].item() == 1.0
        assert metrics["images"] == 8
    if method.needs_text:
        assert 0 < metrics["logit_scale"].item() <= 100
        assert {"i2t_loss", "t2i_loss"} <= set(metrics)


@pytest.mark.parametrize("name", ["stablerep", "stablerep+", "simclr", "clip"])
def test_caption_loss_is_there_when_the_method_declares_a_caption_score(name):
    """``caption_score`` says whether ``metrics["caption_loss"]`` ([G], detached) comes with every step;
    for StableRep it is the mean per-anchor image loss of each group, whose mean is the loss itself."""
    method = build_method(name)
    model = tiny_model(method.needs_text, method.needs_head)
    batch = caption_batch()
    torch.manual_seed(1)
    loss, metrics = method(model, batch, GPUAugment(size=16, strong=False, scale=(0.6, 1.0)))
    assert ("caption_loss" in metrics) == (METHODS.get(name).caption_score is not None)
    assert (name == "simclr") == (METHODS.get(name).caption_score is None)
    if "caption_loss" in metrics:
        assert metrics["caption_loss"].shape == (batch.num_groups,) and not metrics["caption_loss"].requires_grad
        assert bool((metrics["caption_loss"] > 0).all())
    if name == "stablerep":  # equal groups: the mean of the group means is the mean over anchors
        assert metrics["caption_loss"].mean().item() == pytest.approx(loss.item(), rel=1e-5)
    if name == "clip":
        assert metrics["caption_loss"].mean().item() == pytest.approx(loss.item(), rel=1e-5)


def test_text_methods_need_text_tower():
    with pytest.raises(RuntimeError, match="no text tower"):
        build_method("clip")(tiny_model(False), caption_batch(), GPUAugment(size=16, strong=False))


def test_unwrap_sees_through_wrappers():
    model = tiny_model(False)
    wrapped = torch.nn.DataParallel(model)
    assert unwrap(wrapped) is model and unwrap(model) is model
    holder = torch.nn.Module()
    holder._orig_mod = wrapped  # what torch.compile's wrapper holds
    assert unwrap(holder) is model
