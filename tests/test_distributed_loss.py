"""Two real CPU processes (gloo over TCP on 127.0.0.1): per-rank losses average to the one-process loss.

Gradients: each rank's gradient for its own rows, divided by the world size (what data-parallel
averaging does to the parameter gradients), equals the one-process gradient of those rows.
"""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.objectives.losses import CLIPLoss, MultiPosConLoss

WORLD = 2


def global_batch():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(12, 8, dtype=torch.float64, generator=g)
    labels = torch.tensor([4, 4, 7, 9, 9, 9, 4, 7, 1, 2, 2, 9])  # groups spread over both ranks
    img = torch.randn(8, 6, dtype=torch.float64, generator=g)
    txt = torch.randn(4, 6, dtype=torch.float64, generator=g)
    img_labels = torch.tensor([10, 10, 11, 11, 12, 12, 13, 13])
    txt_labels = torch.tensor([10, 11, 12, 13])
    return feats, labels, img, txt, img_labels, txt_labels


def losses_and_grads(feats, labels, img, txt, img_labels, txt_labels):
    feats = feats.clone().requires_grad_(True)
    img = img.clone().requires_grad_(True)
    txt = txt.clone().requires_grad_(True)
    scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    multipos = MultiPosConLoss(0.1)(feats, labels)
    clip = CLIPLoss()(img, txt, scale, img_labels, txt_labels)["loss"]
    (multipos + clip).backward()
    return {"multipos": multipos.detach(), "clip": clip.detach(), "feats": feats.grad,
            "img": img.grad, "txt": txt.grad, "scale": scale.grad}


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        parts = [t.chunk(WORLD)[rank] for t in global_batch()]
        torch.save(losses_and_grads(*parts), f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_two_gloo_ranks_match_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = losses_and_grads(*global_batch())
    for key in ("multipos", "clip"):
        mean = sum(r[key] for r in ranks) / WORLD
        torch.testing.assert_close(mean, single[key], rtol=1e-10, atol=1e-12)
        assert all(not torch.allclose(r[key], single[key]) for r in ranks)  # ranks really differ
    for key in ("feats", "img", "txt"):
        stitched = torch.cat([r[key] for r in ranks]) / WORLD
        torch.testing.assert_close(stitched, single[key], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(sum(r["scale"] for r in ranks) / WORLD, single["scale"], rtol=1e-8, atol=1e-12)
