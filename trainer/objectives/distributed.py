"""Cross-rank gathers for the contrastive losses.

Every function here is a no-op when ``torch.distributed`` is not initialized or the world has one
rank, so single-process code and tests need no process group. Tests simulate several ranks by
monkeypatching :func:`world_info`, :func:`gather_with_grad` and :func:`gather_no_grad`; the losses
always call them through this module (``distributed.gather_with_grad(...)``) so that works.

Gradient of the gather: :func:`gather_with_grad` keeps the local autograd path (the own slot of the
result is the local tensor's data, and its gradient flows back) and also returns to each rank the
gradient that the *other* ranks' losses put on its slice (all-reduce or reduce-scatter in backward).
With each rank's loss being the mean over its own anchors against the global batch, the data-parallel
average of the parameter gradients then equals the gradient of the single-process loss on the
global batch, which is what the paper's official code computes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_info() -> tuple[int, int]:
    """Return ``(rank, world_size)``; ``(0, 1)`` without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient for this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, world_size = world_info()
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor)
        ctx.rank, ctx.world_size, ctx.local_rows = rank, world_size, tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad_output = grad_output.contiguous()
        rows = ctx.local_rows
        if dist.get_backend() in ("nccl",):
            out = torch.empty_like(grad_output[:rows])
            dist.reduce_scatter_tensor(out, grad_output, op=dist.ReduceOp.SUM)
            return out
        summed = grad_output.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed[ctx.rank * rows:(ctx.rank + 1) * rows].clone()


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [B, ...] from all ranks into [world_size * B, ...], differentiably.

    Every rank must pass the same shape. Rank ``r``'s rows are ``[r * B, (r + 1) * B)``. Returns
    ``tensor`` itself when the world has one rank.
    """
    _, world_size = world_info()
    if world_size == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [B, ...] from all ranks into [world_size * B, ...] (no gradient).

    Used for labels. Returns ``tensor`` itself when the world has one rank.
    """
    _, world_size = world_info()
    if world_size == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)
