"""The paper's projection head, shared by the image side (``StableRepModel.head``) and the text
tower's ``mlp`` projection (``trainer.models.text_tower.build_projection``)."""
from __future__ import annotations

from torch import nn


def projection_head(in_dim: int, hidden: int = 4096, out: int = 256, layers: int = 3) -> nn.Sequential:
    """The paper's MLP head: ``layers - 1`` blocks of Linear-BN-ReLU, then Linear(hidden, out).

    ``[N, in_dim] -> [N, out]``. ``layers=1`` is a single Linear(in_dim, out); ``layers=0`` is no head
    at all (identity, ``[N, in_dim]``), for image-text-only models such as CLIP.
    """
    if layers < 0:
        raise ValueError(f"head_layers must be >= 0, got {layers}")
    if layers == 0:
        return nn.Sequential()
    blocks: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        blocks += [nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        dim = hidden
    blocks.append(nn.Linear(dim, out))
    return nn.Sequential(*blocks)
