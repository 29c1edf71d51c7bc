"""Losses against independent float64 references, and the multi-rank path with a simulated gather."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.objectives import distributed
from trainer.objectives.losses import CLIPLoss, MultiPosConLoss, SimCLRLoss, StableRepPlusLoss


def reference_multipos(features: torch.Tensor, labels: list[int], temperature: float) -> torch.Tensor:
    """Plain-loop StableRep loss: explicit softmax over the other samples, uniform target."""
    n = features.shape[0]
    z = features / features.norm(dim=1, keepdim=True)
    total = features.new_zeros(())
    for i in range(n):
        others = [j for j in range(n) if j != i]
        positives = [j for j in others if labels[j] == labels[i]]
        if not positives:
            continue
        logits = {j: (z[i] * z[j]).sum() / temperature for j in others}
        log_norm = torch.log(sum(torch.exp(logits[j]) for j in others))
        for j in positives:
            total = total - (logits[j] - log_norm) / len(positives)
    return total / n


def reference_clip(img: torch.Tensor, txt: torch.Tensor, img_labels: list[int], txt_labels: list[int],
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-loop image->text and text->image multi-positive cross-entropies."""
    zi = img / img.norm(dim=1, keepdim=True)
    zt = txt / txt.norm(dim=1, keepdim=True)

    def one_direction(anchors, anchor_labels, keys, key_labels):
        total = anchors.new_zeros(())
        for a in range(anchors.shape[0]):
            logits = [scale * (anchors[a] * keys[k]).sum() for k in range(keys.shape[0])]
            log_norm = torch.log(sum(torch.exp(v) for v in logits))
            pos = [k for k in range(keys.shape[0]) if key_labels[k] == anchor_labels[a]]
            for k in pos:
                total = total - (logits[k] - log_norm) / len(pos)
        return total / anchors.shape[0]

    return one_direction(zi, img_labels, zt, txt_labels), one_direction(zt, txt_labels, zi, img_labels)


def uneven_groups(seed: int) -> list[int]:
    """Labels with groups of sizes 1..5 (shuffled), including singletons."""
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 2, 3, 4, 5, 1, 3]
    labels = [100 + k for k, s in enumerate(sizes) for _ in range(s)]
    order = torch.randperm(len(labels), generator=g).tolist()
    return [labels[i] for i in order]


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_multipos_matches_reference_values_and_gradients(temperature):
    labels = uneven_groups(0)
    x = torch.randn(len(labels), 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    loss = MultiPosConLoss(temperature)(x1, torch.tensor(labels))
    ref = reference_multipos(x2, labels, temperature)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    (g1,) = torch.autograd.grad(loss, x1)
    (g2,) = torch.autograd.grad(ref, x2)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10)
    assert loss.item() > 0


def test_multipos_float32_and_details():
    labels = torch.tensor(uneven_groups(3))
    x = torch.randn(len(labels), 16, generator=torch.Generator().manual_seed(4))
    loss, details = MultiPosConLoss(0.1)(x, labels, return_details=True)
    ref = reference_multipos(x.double(), labels.tolist(), 0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    counts = [sum(1 for m in labels.tolist() if m == label) - 1 for label in labels.tolist()]
    assert details["positives_per_anchor"].item() == pytest.approx(sum(counts) / len(counts))
    assert details["anchors_without_positives"].item() == pytest.approx(counts.count(0) / len(counts))


def test_multipos_bfloat16_input_is_computed_in_float32():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(5))
    loss_bf16 = MultiPosConLoss()(x.bfloat16(), labels)
    assert loss_bf16.dtype == torch.float32
    torch.testing.assert_close(loss_bf16, MultiPosConLoss()(x.bfloat16().float(), labels))


def test_singletons_give_zero_and_no_nan():
    x = torch.randn(5, 4, requires_grad=True)
    loss = MultiPosConLoss()(x, torch.arange(5))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(x.grad).all()
    one = torch.randn(1, 4, requires_grad=True)
    loss_one = MultiPosConLoss()(one, torch.tensor([7]))
    loss_one.backward()
    assert loss_one.item() == 0.0 and torch.isfinite(one.grad).all()


def test_labels_change_between_calls_with_same_batch_size():
    """No mask is cached by batch size: same features, new labels, new loss."""
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    loss_fn = MultiPosConLoss()
    a = loss_fn(x, torch.tensor([0, 0, 0, 1, 1, 1]))
    b = loss_fn(x, torch.tensor([0, 1, 0, 1, 0, 1]))
    torch.testing.assert_close(a, torch.as_tensor(reference_multipos(x.double(), [0, 0, 0, 1, 1, 1], 0.1)).float())
    torch.testing.assert_close(b, torch.as_tensor(reference_multipos(x.double(), [0, 1, 0, 1, 0, 1], 0.1)).float())
    assert not torch.allclose(a, b)


def test_rejects_bad_shapes_and_temperature():
    with pytest.raises(ValueError, match="labels"):
        MultiPosConLoss()(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        MultiPosConLoss(0.0)


def test_simclr_is_two_view_multipos():
    a = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    b = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    loss = SimCLRLoss(0.2)(a, b)
    ref = reference_multipos(torch.cat([a, b]), [0, 1, 2, 3, 0, 1, 2, 3], 0.2)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)


def test_clip_and_stablerep_plus_match_reference():
    g = torch.Generator().manual_seed(8)
    img_labels = [3, 3, 3, 5, 5, 5, 9, 9, 9]
    txt_labels = [3, 5, 9]
    ssl = torch.randn(9, 6, dtype=torch.float64, generator=g, requires_grad=True)
    img = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    txt = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    logit_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    out = StableRepPlusLoss(0.1, image_weight=1.0, text_weight=0.5)(
        ssl, img, txt, torch.tensor(img_labels), torch.tensor(txt_labels), logit_scale)
    i2t, t2i = reference_clip(img, txt, img_labels, txt_labels, 1 / 0.07)
    image_loss = reference_multipos(ssl, img_labels, 0.1)
    torch.testing.assert_close(out["i2t_loss"], i2t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["t2i_loss"], t2i, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["loss"], image_loss + 0.5 * (i2t + t2i) / 2, rtol=1e-6, atol=1e-6)
    out["loss"].backward()
    assert logit_scale.grad is not None and logit_scale.grad.abs() > 0
    assert out["positives_per_anchor"].item() == 2.0


def test_clip_logit_scale_is_not_clamped_in_the_forward():
    # official: exp(scale) is used as is; the parameter is clamped after the optimizer step instead,
    # so above ln 100 the gradient still flows
    img, txt = torch.randn(4, 5), torch.randn(4, 5)
    big = torch.tensor(5.0, requires_grad=True)
    out = CLIPLoss()(img, txt, big)
    assert out["logit_scale"].item() == pytest.approx(math.exp(5.0), rel=1e-6)
    i2t, t2i = reference_clip(img.double(), txt.double(), [0, 1, 2, 3], [0, 1, 2, 3], math.exp(5.0))
    torch.testing.assert_close(out["loss"].double(), (i2t + t2i) / 2, rtol=1e-5, atol=1e-5)
    out["loss"].backward()
    assert big.grad is not None and big.grad.abs() > 0


class SimulatedWorld:
    """Stands in for the collectives of ``world_size`` ranks inside one process.

    ``peers[k][r]`` is what rank ``r`` contributes to the ``k``-th differentiable gather of a loss call
    (computed from the same leaf tensors, so gradients flow to every rank's inputs); the calling
    rank's own slot is the tensor it passes, as in a real all-gather.
    """

    def __init__(self, monkeypatch, world_size: int, grad_peers: list[list[torch.Tensor]],
                 label_peers: list[list[torch.Tensor]]) -> None:
        self.world_size, self.rank = world_size, 0
        self.grad_peers, self.label_peers = grad_peers, label_peers
        self.calls = {"grad": 0, "label": 0}
        monkeypatch.setattr(distributed, "world_info", lambda: (self.rank, self.world_size))
        monkeypatch.setattr(distributed, "gather_with_grad", lambda t: self._gather(t, "grad", self.grad_peers))
        monkeypatch.setattr(distributed, "gather_no_grad", lambda t: self._gather(t, "label", self.label_peers))

    def set_rank(self, rank: int) -> None:
        self.rank = rank
        self.calls = {"grad": 0, "label": 0}

    def _gather(self, tensor, kind, peers):
        parts = list(peers[self.calls[kind]])
        self.calls[kind] += 1
        assert parts[self.rank].shape == tensor.shape
        parts[self.rank] = tensor
        return torch.cat(parts)


def test_multipos_gathered_path_equals_single_process(monkeypatch):
    world = 3
    labels = torch.tensor(uneven_groups(9)[:18])
    x = torch.randn(18, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    x_single = x.clone().requires_grad_(True)
    single = MultiPosConLoss()(x_single, labels)
    single.backward()

    x_ranks = x.clone().requires_grad_(True)
    chunks = x_ranks.chunk(world)
    sim = SimulatedWorld(monkeypatch, world, [[F.normalize(c, dim=-1) for c in chunks]], [labels.chunk(world)])
    losses = []
    for r in range(world):
        sim.set_rank(r)
        losses.append(MultiPosConLoss()(chunks[r], labels.chunk(world)[r]))
    mean = torch.stack(losses).mean()
    torch.testing.assert_close(mean, single.detach(), rtol=1e-10, atol=1e-10)
    mean.backward()
    torch.testing.assert_close(x_ranks.grad, x_single.grad, rtol=1e-8, atol=1e-10)


def test_clip_gathered_path_equals_single_process(monkeypatch):
    world = 2
    g = torch.Generator().manual_seed(11)
    img = torch.randn(8, 4, dtype=torch.float64, generator=g)
    txt = torch.randn(4, 4, dtype=torch.float64, generator=g)
    img_labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    txt_labels = torch.tensor([0, 1, 2, 3])
    scale = torch.tensor(2.0, dtype=torch.float64)
    single = CLIPLoss()(img, txt, scale, img_labels, txt_labels)["loss"]
    ic, tc = img.chunk(world), txt.chunk(world)
    sim = SimulatedWorld(monkeypatch, world,
                         [[F.normalize(c, dim=-1) for c in ic], [F.normalize(c, dim=-1) for c in tc]],
                         [img_labels.chunk(world), txt_labels.chunk(world)])
    losses = []
    for r in range(world):
        sim.set_rank(r)
        losses.append(CLIPLoss()(ic[r], tc[r], scale, img_labels.chunk(world)[r], txt_labels.chunk(world)[r])["loss"])
    torch.testing.assert_close(torch.stack(losses).mean(), single, rtol=1e-10, atol=1e-10)


def test_uneven_rank_sizes_are_refused(monkeypatch):
    monkeypatch.setattr(distributed, "world_info", lambda: (0, 2))
    monkeypatch.setattr(distributed, "gather_with_grad", lambda t: torch.cat([t, t[:1]]))
    monkeypatch.setattr(distributed, "gather_no_grad", lambda t: torch.cat([t, t[:1]]))
    with pytest.raises(ValueError, match="same number of samples"):
        MultiPosConLoss()(torch.randn(4, 3), torch.arange(4))
