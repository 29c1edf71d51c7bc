"""Training methods: how one ``Batch`` of caption groups becomes a loss.

``build_method(name, **cfg)`` for ``stablerep | stablerep+ | simclr | clip``. A method is called as
``method(model, batch, augment) -> (loss, metrics)``: ``loss`` is a differentiable scalar, ``metrics`` a
dict of detached scalar tensors plus ``images`` (a Python int: the images in the loss), so no
host sync happens here; ``float()`` the tensors when logging.
``method.needs_text`` tells the trainer to build the model with a text tower; ``method.needs_head``
False (clip) means the projection head is unused, so build with ``head_layers=0`` (or let DDP find
unused parameters).

Every method class declares the official recipe's facts about it (:class:`MethodFacts`): ``official``
(images per caption and crops per image that the official recipe fixes for it, e.g. SimCLR 1 and 2),
``views_in_loss`` (the counts that really reach its loss, which the lr rule uses), ``takes_temperature``
(whether it is built with ``method.temperature``; CLIP learns its logit scale) and ``caption_score``
(what its per-caption difficulty is, or None when it reports none).

Per-caption difficulty: a method with a ``caption_score`` also puts ``caption_loss`` in ``metrics``, a
detached float ``[G]`` aligned with ``batch.caption_ids``: the mean of the per-anchor losses of each
group's views (``trainer.objectives.caption_difficulty`` keeps its moving average per caption, and the
online source sends it to the generators). It is read from the loss's own detached rows, so the loss
and its gradient are the same with or without it, and it stays on the device. StableRep and StableRep+
score a caption by the multi-positive image loss of its views (how hard its images are to tie
together against the other captions); CLIP by the mean of its image's image-to-text and its text's
text-to-image loss; SimCLR reports none: its positives are two crops of one image, so its loss says
how distinctive that one image is, not how hard the caption is.

Methods are found by name in :data:`METHODS`: the ones below, and those installed packages declare in
the entry-point group ``stablerep.methods`` (``infra.registry``); a plugin's method subclasses
:class:`MethodFacts` like the ones here.

Labels come from ``batch.caption_ids`` on every call (globally unique per caption), never from the
batch size: the images of one caption are positives of each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from infra.registry import Registry
from trainer.augment import GPUAugment
from trainer.data.batch import Batch
from trainer.objectives.losses import CLIPLoss, MultiPosConLoss, SimCLRLoss, StableRepPlusLoss

METHODS: Registry[type] = Registry("method", group="stablerep.methods")


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator adding a method under ``name`` to :data:`METHODS` (and naming it)."""
    def add(cls: type) -> type:
        cls.name = name
        return METHODS.register(name, cls)
    return add


@dataclass(frozen=True)
class OfficialViews:
    """What the official recipe fixes for a method: images drawn per caption (its ``--n_img``) and
    augmented crops per image (``--num_crop``). ``None``: the method takes the config's value (the
    preset's); config resolution (``trainer.config.resolve_method_views``) applies the rest."""

    draw_per_caption: int | None = None
    crops_per_image: int | None = None


class MethodFacts:
    """Class-level facts every method declares; the defaults are StableRep's (all drawn images, every
    crop of them, no value fixed by the official recipe)."""

    official = OfficialViews()
    takes_temperature = True  # built with temperature=method.temperature (unless method.kwargs sets it)
    #: what ``metrics["caption_loss"]`` holds for each caption (None: the method reports no per-caption score)
    caption_score: str | None = "mean multi-positive image loss of the caption's views"

    @staticmethod
    def views_in_loss(draw_per_caption: int, crops_per_image: int) -> tuple[int, int]:
        """(images per caption, crops per image) that reach the loss when the source draws
        ``draw_per_caption`` images of each caption and the augmentation asks for ``crops_per_image``.
        The lr rule and ``images_per_step`` use these counts."""
        return int(draw_per_caption), max(1, int(crops_per_image))

    @classmethod
    def one_image_per_caption(cls) -> bool:
        """True when the loss takes one image of each caption however many are drawn (SimCLR, CLIP)."""
        return all(cls.views_in_loss(drawn, 1)[0] == 1 for drawn in (2, 6))



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


def _views(images: torch.Tensor, caption_ids: torch.Tensor, crops: int, augment: GPUAugment):
    """Augmented views of uint8 ``[G, n, H, W, 3]``: every image ``crops`` times, group-major.

    Returns float ``[G*n*crops, 3, S, S]`` (group 0's ``n*crops`` views first, the crops of one image
    next to each other), int64 labels ``[G*n*crops]`` = caption id of each view, and the views per
    group ``n*crops`` (for the per-view projection head).
    """
    g, n = images.shape[:2]
    flat = images.flatten(0, 1)                                         # [G*n, H, W, 3]
    if crops > 1:
        flat = flat.repeat_interleave(crops, dim=0)                     # [G*n*crops, H, W, 3]
    labels = caption_ids.repeat_interleave(n * crops)
    return augment(flat), labels, n * crops


def _crops(augment: GPUAugment) -> int:
    return int(getattr(augment, "crops_per_image", 1))


def caption_loss(anchor_loss: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean per-anchor loss of each group: float ``[G * v]`` (group-major, ``v`` views per group, as
    :func:`_views` orders them) -> float ``[G]``, detached (no host sync)."""
    return anchor_loss.detach().view(groups, -1).mean(dim=1)


@register_method("stablerep")
class StableRepMethod(MethodFacts):
    """All ``G x n`` images, ``augment.crops_per_image`` augmentations each; positives = every view of the
    same caption."""

    needs_text = False
    needs_head = True

    def __init__(self, temperature: float = 0.1) -> None:
        self.loss = MultiPosConLoss(temperature)

    def __call__(self, model: nn.Module, batch: Batch, augment: GPUAugment):
        device = _device(model)
        views, labels, per_group = _views(batch.images.to(device, non_blocking=True),
                                          batch.caption_ids.to(device, non_blocking=True),
                                          self.views_in_loss(batch.images.shape[1], _crops(augment))[1], augment)
        features = model(views, views=per_group)                        # [G*n*crops, head_out]
        loss, details = self.loss(features, labels, return_details=True)
        anchor_loss = details.pop("anchor_loss")
        return loss, {"loss": loss.detach(), "image_loss": loss.detach(), **details,
                      "caption_loss": caption_loss(anchor_loss, batch.num_groups), "images": int(views.shape[0])}


@register_method("simclr")
class SimCLRMethod(MethodFacts):
    """The first image of each group, ``max(2, crops_per_image)`` crops of it (official SimCLR: one image
    per caption, num_crop 2); positives = the other crops of the same image."""

    needs_text = False
    needs_head = True
    official = OfficialViews(draw_per_caption=1, crops_per_image=2)  # official --n_img 1 --num_crop 2
    caption_score = None  # its positives are crops of one image: no per-caption difficulty

    @staticmethod
    def views_in_loss(draw_per_caption: int, crops_per_image: int) -> tuple[int, int]:
        """One image per caption (the first drawn), at least two crops of it."""
        return 1, max(2, int(crops_per_image))

    def __init__(self, temperature: float = 0.1) -> None:
        self.loss = SimCLRLoss(temperature)  # a MultiPosConLoss: labels = image ids

    def __call__(self, model: nn.Module, batch: Batch, augment: GPUAugment):
        device = _device(model)
        first = batch.images[:, :1].to(device, non_blocking=True)      # [G, 1, H, W, 3]
        views, labels, per_group = _views(first, batch.caption_ids.to(device, non_blocking=True),
                                          self.views_in_loss(1, _crops(augment))[1], augment)
        features = model(views, views=per_group)                        # [G*crops, head_out]
        loss, details = MultiPosConLoss.forward(self.loss, features, labels, return_details=True)
        details.pop("anchor_loss")
        return loss, {"loss": loss.detach(), "image_loss": loss.detach(), **details,
                      "images": int(views.shape[0])}


@register_method("clip")
class CLIPMethod(MethodFacts):
    """The first image of each group and its caption; image-text contrastive loss only."""

    takes_temperature = False  # a learned logit scale instead
    needs_text = True
    needs_head = False
    official = OfficialViews(draw_per_caption=1, crops_per_image=1)  # official --n_img 1, one crop
    caption_score = "mean of the caption's image-to-text and text-to-image losses"

    @staticmethod
    def views_in_loss(draw_per_caption: int, crops_per_image: int) -> tuple[int, int]:
        """One image per caption (the first drawn), one crop of it."""
        return 1, 1

    def __init__(self) -> None:
        self.loss = CLIPLoss()

    def __call__(self, model: nn.Module, batch: Batch, augment: GPUAugment):
        device = _device(model)
        images = batch.images[:, 0].to(device, non_blocking=True)      # [G, H, W, 3]
        ids = batch.caption_ids.to(device, non_blocking=True)
        tokens = unwrap(model).tokenize(batch.captions, device)  # [G, L]
        out = model(augment(images), tokens, ssl=False)
        parts = self.loss(out["image_embed"], out["text_embed"], out["logit_scale"], ids, ids)
        rows = (parts.pop("i2t_anchor_loss") + parts.pop("t2i_anchor_loss")) / 2  # [G]: one image, one text each
        metrics = {k: v.detach() for k, v in parts.items()}
        metrics["caption_loss"] = caption_loss(rows, batch.num_groups)
        metrics["images"] = int(images.shape[0])
        return parts["loss"], metrics


@register_method("stablerep+")
class StableRepPlusMethod(MethodFacts):
    """StableRep on all ``G x n`` images plus image-text terms against each group's caption."""

    needs_text = True
    needs_head = True

    def __init__(self, temperature: float = 0.1, image_weight: float = 1.0, text_weight: float = 1.0) -> None:
        self.loss = StableRepPlusLoss(temperature, image_weight, text_weight)

    def __call__(self, model: nn.Module, batch: Batch, augment: GPUAugment):
        device = _device(model)
        text_labels = batch.caption_ids.to(device, non_blocking=True)
        views, labels, per_group = _views(batch.images.to(device, non_blocking=True), text_labels,
                                          self.views_in_loss(batch.images.shape[1], _crops(augment))[1], augment)
        tokens = unwrap(model).tokenize(batch.captions, device)  # [G, L]
        out = model(views, tokens, ssl=True, views=per_group)
        parts = self.loss(out["ssl"], out["image_embed"], out["text_embed"], labels, text_labels,
                          out["logit_scale"])
        anchor_loss = parts.pop("anchor_loss")
        metrics = {k: v.detach() for k, v in parts.items()}
        metrics["caption_loss"] = caption_loss(anchor_loss, batch.num_groups)
        metrics["images"] = int(views.shape[0])
        return parts["loss"], metrics
