"""The projection head with per-view BatchNorm statistics in one call per layer.

The official recipe applies the head to each view chunk separately (the ``G`` rows at index ``j`` of
every group), so every BatchNorm normalizes with the statistics of its own view. Calling the head
once per view costs a graph break and a SyncBatchNorm all-reduce per view and layer. The same
statistics come from one call: group-major rows ``[G * V, C]`` are viewed as ``[G, V * C]``, so
each (view, channel) pair is its own BatchNorm channel; weight and bias are the module's own,
repeated per view (their gradients sum over the views, as V calls would). Running statistics are
updated on per-view copies and folded back as V sequential momentum updates would leave them.
Linear and ReLU layers act row by row and see all ``G * V`` rows at once.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm


def per_view_batch_norm(norm: _BatchNorm, x: torch.Tensor, views: int) -> torch.Tensor:
    """``norm`` (BatchNorm1d / SyncBatchNorm over C channels) with per-view statistics.

    x: ``[G * V, C]``, group-major (row ``g * V + j`` is view ``j`` of group ``g``). Returns ``[G * V, C]``,
    equal to normalizing the rows of each view ``j`` by their own statistics.
    """
    if views == 1 or not norm.training:  # one view, or running statistics: every row the same way
        return norm(x)
    if norm.momentum is None or not norm.affine or not norm.track_running_stats:
        grouped = x.view(-1, views, x.shape[-1])  # rare settings: one call per view
        return torch.stack([norm(grouped[:, j]) for j in range(views)], dim=1).flatten(0, 1)
    channels = x.shape[-1]
    mean0, var0 = norm.running_mean, norm.running_var
    state = {
        "weight": norm.weight.repeat(views), "bias": norm.bias.repeat(views),
        "running_mean": mean0.repeat(views), "running_var": var0.repeat(views),
        "num_batches_tracked": norm.num_batches_tracked.clone(),
    }
    out = functional_call(norm, state, (x.reshape(-1, views * channels),))
    with torch.no_grad():  # V sequential updates r <- (1 - m) r + m s_j, from the per-view copies r_j
        keep = 1.0 - norm.momentum
        decay = keep ** torch.arange(views - 1, -1, -1, dtype=mean0.dtype, device=mean0.device)  # (1-m)^(V-1-j)
        for buffer, updated in ((mean0, state["running_mean"]), (var0, state["running_var"])):
            steps = updated.view(views, channels) - keep * buffer  # m * s_j
            buffer.mul_(keep ** views).add_((decay.unsqueeze(1) * steps).sum(0))
        norm.num_batches_tracked.add_(views)
    return out.view(-1, channels)


def project_per_view(head: nn.Module, features: torch.Tensor, views: int) -> torch.Tensor:
    """Run ``head`` (an ``nn.Sequential`` of row-wise layers and BatchNorms, or one such layer) on
    group-major ``[G * V, F]`` features with per-view BatchNorm statistics -> ``[G * V, out]``."""
    if features.shape[0] % views:
        raise ValueError(f"{features.shape[0]} feature rows do not split into groups of {views} views")
    x = features
    for layer in head if isinstance(head, nn.Sequential) else [head]:
        x = per_view_batch_norm(layer, x, views) if isinstance(layer, _BatchNorm) else layer(x)
    return x
