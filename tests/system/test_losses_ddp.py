"""NT-Xent, VICReg and DINO across 2 processes (gloo) equal the single-process loss on the full batch.

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

from selfsup.losses import DINOLoss, NTXentLoss, VICRegLoss

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


def dino_batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher (2, N, D) and student (4, N, D) outputs of step ``step``."""
    g = torch.Generator().manual_seed(10 + step)
    return 3 * torch.randn(2, N, D, generator=g, dtype=torch.double), torch.randn(
        4, N, D, generator=g, dtype=torch.double
    )


def _dino_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=W)
    try:
        loss_fn, n, results = DINOLoss(D).double(), N // W, []
        for step in range(2):  # the second step uses the centre the first one left
            teacher, student = dino_batches(step)
            s = student[:, rank * n : (rank + 1) * n].clone().requires_grad_()
            loss = loss_fn(teacher[:, rank * n : (rank + 1) * n], s, teacher_temp=0.04)
            loss.backward()
            reported = loss.detach().clone()
            dist.all_reduce(reported)
            results.append({"loss": reported / W, "grad": s.grad / W, "center": loss_fn.center.clone()})
        torch.save(results, Path(out) / f"dino{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_dino_centre_is_the_mean_over_the_global_batch(tmp_path: Path) -> None:
    """Each rank centres the teacher by the running mean over both ranks' outputs: the centre, the
    loss and the gradients equal one process's on the whole batch, step after step."""
    mp.spawn(_dino_worker, args=(free_port(), str(tmp_path)), nprocs=W, join=True)
    loss_fn, n = DINOLoss(D).double(), N // W
    for step in range(2):
        teacher, student = dino_batches(step)
        s = student.clone().requires_grad_()
        loss = loss_fn(teacher, s, teacher_temp=0.04)
        loss.backward()
        assert s.grad is not None
        for rank in range(W):
            r = torch.load(tmp_path / f"dino{rank}.pt", weights_only=True)[step]
            assert r["loss"].item() == pytest.approx(loss.item(), rel=1e-12)
            torch.testing.assert_close(r["center"], loss_fn.center, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(r["grad"], s.grad[:, rank * n : (rank + 1) * n], rtol=1e-10, atol=1e-12)
