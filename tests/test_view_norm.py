"""Per-view BatchNorm in one call (trainer/models/view_norm.py) against the head run once per view chunk."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trainer.models.view_norm import per_view_batch_norm, project_per_view

TIGHT = {"rtol": 1e-5, "atol": 1e-6}  # float32 rounding only: chunks are strided, the stacked batch is not


def per_chunk(module: nn.Module, x: torch.Tensor, views: int) -> torch.Tensor:
    """The reference: ``module`` once per view chunk (the rows at index j of every group), regrouped."""
    grouped = x.view(-1, views, x.shape[-1])
    return torch.stack([module(grouped[:, j]) for j in range(views)], dim=1).flatten(0, 1)


def random_norm(channels: int, sync: bool) -> nn.Module:
    norm = nn.BatchNorm1d(channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    return nn.SyncBatchNorm.convert_sync_batchnorm(norm) if sync else norm


@pytest.mark.parametrize("sync", [False, True])
def test_one_call_keeps_per_view_statistics_outputs_gradients_and_running_stats(sync):
    torch.manual_seed(0)
    groups, views, channels = 7, 4, 16
    norm = random_norm(channels, sync)
    reference = copy.deepcopy(norm)
    x = (torch.randn(groups * views, channels) * torch.linspace(0.5, 3, views).repeat(groups).unsqueeze(1)
         + torch.arange(views).repeat(groups).unsqueeze(1))  # every view its own mean and scale
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = per_view_batch_norm(norm, x1, views), per_chunk(reference, x2, views)
    torch.testing.assert_close(out, expected, **TIGHT)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, **TIGHT)
    torch.testing.assert_close(norm.weight.grad, reference.weight.grad, **TIGHT)
    torch.testing.assert_close(norm.bias.grad, reference.bias.grad, **TIGHT)
    # running statistics as after `views` sequential momentum updates
    torch.testing.assert_close(norm.running_mean, reference.running_mean, **TIGHT)
    torch.testing.assert_close(norm.running_var, reference.running_var, **TIGHT)
    assert int(norm.num_batches_tracked) == int(reference.num_batches_tracked) == views
    # the check can fail: one BN over all rows, or the rows read view-major, give other numbers
    assert not torch.allclose(reference(x), expected, **TIGHT)
    view_major = per_chunk(copy.deepcopy(norm), x.view(groups, views, -1).transpose(0, 1).reshape(-1, channels), views)
    assert not torch.allclose(view_major, expected, **TIGHT)


def test_head_in_one_call_per_layer_equals_the_head_per_chunk():
    torch.manual_seed(1)
    head = nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.BatchNorm1d(32),
                         nn.ReLU(), nn.Linear(32, 8)).train()
    reference = copy.deepcopy(head)
    features = torch.randn(5 * 3, 12)
    torch.testing.assert_close(project_per_view(head, features, 3), per_chunk(reference, features, 3), **TIGHT)
    for a, b in zip(head.modules(), reference.modules()):
        if isinstance(a, nn.BatchNorm1d):
            torch.testing.assert_close(a.running_var, b.running_var, **TIGHT)
    head.eval(), reference.eval()  # running statistics: every row the same way
    torch.testing.assert_close(project_per_view(head, features, 3), reference(features), **TIGHT)
    with pytest.raises(ValueError, match="do not split into groups of 4 views"):
        project_per_view(head, features, 4)
