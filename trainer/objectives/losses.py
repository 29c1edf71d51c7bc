"""Contrastive losses: StableRep's multi-positive loss, StableRep+, SimCLR and CLIP.

All losses run in float32 (autocast is switched off inside), L2-normalize their inputs, and gather
the keys from every rank with :func:`trainer.objectives.distributed.gather_with_grad` when the world has more
than one rank. Each rank's loss is the mean over its *own* anchors against the *global* batch, so the
mean of the per-rank losses (and, after data-parallel gradient averaging, the gradient) equals the
single-process loss on the concatenated global batch. Every rank must hold the same number of rows.
Labels are built from each call's own labels; nothing is cached between calls.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.objectives import distributed

_MASKED_LOGIT = -1e9  # added to self-similarity logits; finite so that 0 * log_softmax stays 0


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy between a target distribution and ``softmax(logits)``.

    Args:
        logits: float ``[A, K]``.
        targets: float ``[A, K]``, rows summing to 1 (or all zero: that row's loss is 0).
    Returns:
        float ``[A]``.
    """
    return -(targets * logits.log_softmax(dim=-1)).sum(dim=-1)


def _targets_from_labels(anchor_labels: torch.Tensor, key_labels: torch.Tensor,
                         self_index: torch.Tensor | None = None,
                         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform target over the keys sharing each anchor's label.

    Args:
        anchor_labels: int ``[A]``.
        key_labels: int ``[K]``.
        self_index: int ``[A]`` or None; key column of each anchor itself, excluded from its positives.
    Returns:
        targets float ``[A, K]`` (rows sum to 1, or 0 without positives) and positive counts int ``[A]``.
    """
    positives = anchor_labels.view(-1, 1) == key_labels.view(1, -1)
    if self_index is not None:
        rows = torch.arange(anchor_labels.shape[0], device=positives.device)
        positives[rows, self_index] = False
    counts = positives.sum(dim=1)
    targets = positives.to(dtype) / counts.clamp(min=1).unsqueeze(1).to(dtype)
    return targets, counts


def _rank_offset(local_rows: int, global_rows: int) -> int:
    """First global row of this rank; checks that every rank contributed ``local_rows`` rows."""
    rank, world_size = distributed.world_info()
    if global_rows != local_rows * world_size:
        raise ValueError(
            f"gathered {global_rows} rows from {world_size} ranks holding {local_rows} rows each: "
            "every rank must pass the same number of samples"
        )
    return rank * local_rows


def _full_precision(tensor: torch.Tensor) -> torch.Tensor:
    """float32 for half / bfloat16 / integer inputs; float64 stays float64."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def _device_type(tensor: torch.Tensor) -> str:
    return tensor.device.type if tensor.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"


class MultiPosConLoss(nn.Module):
    """StableRep's multi-positive contrastive loss.

    ``logits = z z^T / T`` over the global batch (``z`` L2-normalized), self-similarity masked out;
    the target of anchor ``i`` is uniform over the *other* samples with label ``labels[i]`` anywhere
    in the global batch; loss = cross-entropy(target, softmax(logits)), averaged over the local
    anchors. An anchor without positives contributes 0 (it still counts in the mean).
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, features: torch.Tensor, labels: torch.Tensor,
                return_details: bool = False):
        """Args:
            features: float ``[N, D]`` (this rank's samples; any dtype, computed in float32).
            labels: int ``[N]``; equal labels mark positives, globally unique across ranks.
            return_details: also return a dict with ``positives_per_anchor`` (mean number of positives
                of the local anchors), ``anchors_without_positives`` (fraction) and ``anchor_loss``
                (float ``[N]``: each local anchor's cross-entropy before the mean), all detached.
        Returns:
            scalar loss, or ``(loss, details)`` when ``return_details``.
        """
        if features.dim() != 2 or labels.shape != (features.shape[0],):
            raise ValueError(f"expected features [N, D] and labels [N], got {tuple(features.shape)} "
                             f"and {tuple(labels.shape)}")
        with torch.autocast(_device_type(features), enabled=False):
            z = F.normalize(_full_precision(features), dim=-1)
            all_z = distributed.gather_with_grad(z)
            all_labels = distributed.gather_no_grad(labels)
            n = z.shape[0]
            offset = _rank_offset(n, all_z.shape[0])
            self_index = torch.arange(n, device=z.device) + offset
            logits = z @ all_z.T / self.temperature                   # [n, N_global]
            logits[torch.arange(n, device=z.device), self_index] = _MASKED_LOGIT  # no self-similarity
            targets, counts = _targets_from_labels(labels, all_labels, self_index, logits.dtype)
            anchor_loss = soft_target_cross_entropy(logits, targets)  # [n]
            loss = anchor_loss.mean()
        if not return_details:
            return loss
        details = {
            "positives_per_anchor": counts.float().mean().detach(),
            "anchors_without_positives": (counts == 0).float().mean().detach(),
            "anchor_loss": anchor_loss.detach(),
        }
        return loss, details


class SimCLRLoss(MultiPosConLoss):
    """SimCLR (NT-Xent): the positive of a view is the other augmentation of the same image.

    Implemented as :class:`MultiPosConLoss` with one label per source image.
    """

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor,  # type: ignore[override]
                image_ids: torch.Tensor | None = None, return_details: bool = False):
        """Args:
            view_a, view_b: float ``[B, D]``: features of two augmentations of the same ``B`` images.
            image_ids: int ``[B]`` globally unique per image, or None for ``rank * B + arange(B)``.
        Returns:
            scalar loss (or ``(loss, details)``), as :meth:`MultiPosConLoss.forward`.
        """
        if view_a.shape != view_b.shape:
            raise ValueError(f"view_a {tuple(view_a.shape)} and view_b {tuple(view_b.shape)} differ")
        if image_ids is None:
            rank, _ = distributed.world_info()
            b = view_a.shape[0]
            image_ids = torch.arange(rank * b, (rank + 1) * b, device=view_a.device)
        labels = torch.cat([image_ids, image_ids])
        return super().forward(torch.cat([view_a, view_b]), labels, return_details=return_details)


def _logit_scale_value(logit_scale: torch.Tensor) -> torch.Tensor:
    """``exp(logit_scale)``; float32 (or float64) scalar. Not clamped here: as in the official recipe
    the parameter itself is clamped to ``[0, ln 100]`` after every optimizer step
    (:meth:`trainer.models.stablerep_model.StableRepModel.clamp_logit_scale_`), so its gradient never vanishes."""
    return _full_precision(logit_scale).exp()


class CLIPLoss(nn.Module):
    """Symmetric image-text contrastive loss with a learnable temperature.

    Image->text target: the text(s) carrying the image's label; text->image target: uniform over the
    images carrying the text's label (one-to-one pairs when labels are left out).
    """

    def forward(self, image_embed: torch.Tensor, text_embed: torch.Tensor, logit_scale: torch.Tensor,
                image_labels: torch.Tensor | None = None,
                text_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Args:
            image_embed: float ``[N, E]``.
            text_embed: float ``[G, E]``.
            logit_scale: scalar tensor, log of the inverse temperature (used as ``exp``).
            image_labels: int ``[N]``; text_labels: int ``[G]``. Both None means pairs (N == G).
        Returns:
            dict: scalars ``loss`` = (i2t + t2i) / 2, ``i2t_loss``, ``t2i_loss``, ``logit_scale`` (exp,
            detached); and, detached, ``i2t_anchor_loss`` float ``[N]`` and ``t2i_anchor_loss`` float
            ``[G]`` (each local image's and text's cross-entropy before the mean).
        """
        if (image_labels is None) != (text_labels is None):
            raise ValueError("give both image_labels and text_labels, or neither")
        if image_labels is None:
            if image_embed.shape[0] != text_embed.shape[0]:
                raise ValueError(f"unlabelled pairs need as many images ({image_embed.shape[0]}) "
                                 f"as texts ({text_embed.shape[0]})")
            rank, _ = distributed.world_info()
            n = image_embed.shape[0]
            image_labels = torch.arange(rank * n, (rank + 1) * n, device=image_embed.device)
            text_labels = image_labels
        with torch.autocast(_device_type(image_embed), enabled=False):
            scale = _logit_scale_value(logit_scale)
            img = F.normalize(_full_precision(image_embed), dim=-1)
            txt = F.normalize(_full_precision(text_embed), dim=-1)
            all_img = distributed.gather_with_grad(img)
            all_txt = distributed.gather_with_grad(txt)
            all_img_labels = distributed.gather_no_grad(image_labels)
            all_txt_labels = distributed.gather_no_grad(text_labels)
            _rank_offset(img.shape[0], all_img.shape[0])
            _rank_offset(txt.shape[0], all_txt.shape[0])
            i2t_targets, _ = _targets_from_labels(image_labels, all_txt_labels, dtype=img.dtype)
            t2i_targets, _ = _targets_from_labels(text_labels, all_img_labels, dtype=txt.dtype)
            i2t_rows = soft_target_cross_entropy(scale * img @ all_txt.T, i2t_targets)  # [N]
            t2i_rows = soft_target_cross_entropy(scale * txt @ all_img.T, t2i_targets)  # [G]
            i2t, t2i = i2t_rows.mean(), t2i_rows.mean()
        return {"loss": (i2t + t2i) / 2, "i2t_loss": i2t, "t2i_loss": t2i, "logit_scale": scale.detach(),
                "i2t_anchor_loss": i2t_rows.detach(), "t2i_anchor_loss": t2i_rows.detach()}


class StableRepPlusLoss(nn.Module):
    """StableRep+: ``image_weight * multi-positive image loss + text_weight * (i2t + t2i) / 2``."""

    def __init__(self, temperature: float = 0.1, image_weight: float = 1.0, text_weight: float = 1.0) -> None:
        super().__init__()
        self.image_loss = MultiPosConLoss(temperature)
        self.clip_loss = CLIPLoss()
        self.image_weight = float(image_weight)
        self.text_weight = float(text_weight)

    def forward(self, ssl_features: torch.Tensor, image_embed: torch.Tensor, text_embed: torch.Tensor,
                image_labels: torch.Tensor, text_labels: torch.Tensor,
                logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args:
            ssl_features: float ``[N, D]`` (projection-head output of the N images).
            image_embed: float ``[N, E]`` (image embedding in the joint image-text space).
            text_embed: float ``[G, E]`` (one per caption).
            image_labels: int ``[N]`` caption id of each image; text_labels: int ``[G]``.
            logit_scale: scalar tensor (log inverse temperature of the image-text logits).
        Returns:
            dict of scalars: ``loss``, ``image_loss``, ``i2t_loss``, ``t2i_loss``, ``logit_scale``,
            ``positives_per_anchor``, ``anchors_without_positives``; and ``anchor_loss`` float ``[N]``
            (the image loss of each anchor before the mean, detached).
        """
        image_loss, details = self.image_loss(ssl_features, image_labels, return_details=True)
        clip = self.clip_loss(image_embed, text_embed, logit_scale, image_labels, text_labels)
        total = self.image_weight * image_loss + self.text_weight * clip["loss"]
        return {"loss": total, "image_loss": image_loss, "i2t_loss": clip["i2t_loss"],
                "t2i_loss": clip["t2i_loss"], "logit_scale": clip["logit_scale"], **details}


INITIAL_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)  # the parameter is clamped to [0, MAX_LOGIT_SCALE] after each step
