"""Training methods: how one ``Batch`` of caption groups becomes a loss.

``build_method(name, **cfg)`` for ``stablerep | stablerep+ | simclr | clip``. A method is called as
``method(model, batch, augment) -> (loss, metrics)``: ``loss`` is a differentiable scalar, ``metrics`` a
dict of detached scalar tensors plus ``images`` (a Python int: the images in the loss), so no
host sync happens here; ``float()`` the tensors when logging.
``method.needs_text`` tells the trainer to build the model with a text tower; ``method.needs_head``
False (clip) means the projection head is unused, so build with ``head_layers=0`` (or let DDP find
unused parameters).

Labels come from ``batch.caption_ids`` on every call (globally unique per caption), never from the
batch size: the images of one caption are positives of each other.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from protocol.registry import Registry
from trainer.augment import GPUAugment
from trainer.batch import Batch
from trainer.losses import CLIPLoss, MultiPosConLoss, SimCLRLoss, StableRepPlusLoss

METHODS: Registry[type] = Registry("method")


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator adding a method under ``name`` to :data:`METHODS` (and naming it)."""
    def add(cls: type) -> type:
        cls.name = name
        return METHODS.register(name, cls)
    return add


def build_method(name: str, **cfg):
    """Instantiate the method registered as ``name`` with keyword config ``cfg``."""
    method = METHODS.get(name)
    try:
        return method(**cfg)
    except TypeError as err:
        raise ValueError(f"bad config for method {name!r}: {err}") from err


def unwrap(model: nn.Module) -> nn.Module:
    """The module under data-parallel / compile wrappers (``.module``, ``._orig_mod``)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _all_images(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``[G*n, H, W, 3]`` (group-major) and int64 labels ``[G*n]`` = caption id of each image."""
    images = batch.images.to(device, non_blocking=True)
    n = batch.images_per_group
    labels = batch.caption_ids.to(device, non_blocking=True).repeat_interleave(n)
    return images.flatten(0, 1), labels


def _first_images(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``[G, H, W, 3]`` (the first image of each group) and the caption ids ``[G]``."""
    return (batch.images[:, 0].to(device, non_blocking=True),
            batch.caption_ids.to(device, non_blocking=True))


@register_method("stablerep")
class StableRepMethod:
    """All ``G x n`` images, one augmentation each; positives = images of the same caption."""

    needs_text = False
    needs_head = True

    def __init__(self, temperature: float = 0.1) -> None:
        self.loss = MultiPosConLoss(temperature)

    def __call__(self, model: nn.Module, batch: Batch, augment: GPUAugment):
        device = _device(model)
        images, labels = _all_images(batch, device)
        features = model(augment(images))                       # [G*n, head_out]
        loss, details = self.loss(features, labels, return_details=True)
        return loss, {"loss": loss.detach(), "image_loss": loss.detach(), **details,
                      "images": int(images.shape[0])}


@register_method("simclr")
class SimCLRMethod:
    """The first image of each group, two augmentations; positive = the other view of the same image."""

    needs_text = False
    needs_head = True

    def __init__(self, temperature: float = 0.1) -> None:
        self.loss = SimCLRLoss(temperature)

    def __call__(self, model: nn.Module, batch: Batch, augment: GPUAugment):
        device = _device(model)
        images, ids = _first_images(batch, device)
        views = torch.cat([augment(images), augment(images)])   # [2G, 3, S, S]
        view_a, view_b = model(views).chunk(2)                   # [G, head_out] each
        loss, details = self.loss(view_a, view_b, ids, return_details=True)
        return loss, {"loss": loss.detach(), "image_loss": loss.detach(), **details,
                      "images": int(views.shape[0])}


@register_method("clip")
class CLIPMethod:
    """The first image of each group and its caption; image-text contrastive loss only."""

    needs_text = True
    needs_head = False

    def __init__(self) -> None:
        self.loss = CLIPLoss()

    def __call__(self, model: nn.Module, batch: Batch, augment: GPUAugment):
        device = _device(model)
        images, ids = _first_images(batch, device)
        tokens = unwrap(model).tokenize(batch.captions, device)  # [G, L]
        out = model(augment(images), tokens, ssl=False)
        parts = self.loss(out["image_embed"], out["text_embed"], out["logit_scale"], ids, ids)
        metrics = {k: v.detach() for k, v in parts.items()}
        metrics["images"] = int(images.shape[0])
        return parts["loss"], metrics


@register_method("stablerep+")
class StableRepPlusMethod:
    """StableRep on all ``G x n`` images plus image-text terms against each group's caption."""

    needs_text = True
    needs_head = True

    def __init__(self, temperature: float = 0.1, image_weight: float = 1.0, text_weight: float = 1.0) -> None:
        self.loss = StableRepPlusLoss(temperature, image_weight, text_weight)

    def __call__(self, model: nn.Module, batch: Batch, augment: GPUAugment):
        device = _device(model)
        images, labels = _all_images(batch, device)
        text_labels = batch.caption_ids.to(device, non_blocking=True)
        tokens = unwrap(model).tokenize(batch.captions, device)  # [G, L]
        out = model(augment(images), tokens, ssl=True)
        parts = self.loss(out["ssl"], out["image_embed"], out["text_embed"], labels, text_labels,
                          out["logit_scale"])
        metrics = {k: v.detach() for k, v in parts.items()}
        metrics["images"] = int(images.shape[0])
        return parts["loss"], metrics
