"""NT-Xent and VICReg across 2 processes (gloo) equal the single-process loss on the full batch.

Each rank holds half the images. NT-Xent's loss on a rank is the mean over its own rows against
the columns gathered from both ranks; VICReg's is the loss of the whole gathered batch. The
gather's backward sums gradients over ranks. DDP then averages parameter gradients over the W
ranks, so the gradient that reaches the weights is (1/W) * (what each rank's backward produced
for its inputs): that must equal the single-process gradient of the full-batch loss, slice by slice.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selfsup.losses import NTXentLoss, VICRegLoss

from reference import free_port

N, D, T, W = 8, 5, 0.2, 2
LOSSES = {"ntxent": lambda: NTXentLoss(T), "vicreg": VICRegLoss}


def full_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g, dtype=torch.double), torch.randn(N, D, generator=g, dtype=torch.double)


def _worker(rank: int, port: int, out: str, name: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=W)
    try:
        z0, z1 = full_batch()
        n = N // W
        a = z0[rank * n : (rank + 1) * n].clone().requires_grad_()
        b = z1[rank * n : (rank + 1) * n].clone().requires_grad_()
        loss = LOSSES[name]()(a, b)
        loss.backward()
        # The loss a run reports: the mean of the equal-sized ranks' losses.
        reported = loss.detach().clone()
        dist.all_reduce(reported)
        torch.save({"loss": reported / W, "g0": a.grad / W, "g1": b.grad / W}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_two_processes_match_one_process(name: str, tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path), name), nprocs=W, join=True)
    z0, z1 = (t.clone().requires_grad_() for t in full_batch())
    loss = LOSSES[name]()(z0, z1)
    loss.backward()
    n = N // W
    for rank in range(W):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert r["loss"].item() == pytest.approx(loss.item(), rel=1e-12)
        assert torch.allclose(r["g0"], z0.grad[rank * n : (rank + 1) * n], atol=1e-12)
        assert torch.allclose(r["g1"], z1.grad[rank * n : (rank + 1) * n], atol=1e-12)
