"""NT-Xent against closed forms and a plain per-pair reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.losses import NTXentLoss


def reference_ntxent(z0: torch.Tensor, z1: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR's definition written out pair by pair (Chen et al. 2020, Algorithm 1)."""
    n = z0.shape[0]
    z = F.normalize(torch.cat([z0, z1]), dim=1).double()
    sim = z @ z.T

    def pair_loss(i: int, j: int) -> torch.Tensor:
        denom = sum(torch.exp(sim[i, k] / t) for k in range(2 * n) if k != i)
        return -torch.log(torch.exp(sim[i, j] / t) / denom)

    return sum(pair_loss(k, k + n) + pair_loss(k + n, k) for k in range(n)) / (2 * n)


@pytest.mark.parametrize("t", [0.05, 0.5, 2.0])
@pytest.mark.parametrize("n", [2, 7])
def test_identical_embeddings_give_log_2n_minus_1(n: int, t: float) -> None:
    z = torch.randn(1, 16).expand(n, 16)
    loss = NTXentLoss(t)(z, z)
    assert loss.item() == pytest.approx(math.log(2 * n - 1), abs=1e-5)


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_orthogonal_images_closed_form(t: float) -> None:
    # Both views of image i are the unit vector e_i: positive similarity 1, negatives 0.
    n = 5
    z = torch.eye(n, 8)
    expected = math.log(1 + (2 * n - 2) * math.exp(-1 / t))
    assert NTXentLoss(t)(z.double(), z.double()).item() == pytest.approx(expected, rel=1e-9)


def test_matches_reference_values_and_gradients() -> None:
    torch.manual_seed(0)
    z0 = torch.randn(6, 5, dtype=torch.double, requires_grad=True)
    z1 = torch.randn(6, 5, dtype=torch.double, requires_grad=True)
    loss = NTXentLoss(0.3)(z0, z1)
    ref = reference_ntxent(z0, z1, 0.3)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    g = torch.autograd.grad(loss, (z0, z1))
    gr = torch.autograd.grad(ref, (z0, z1))
    for a, b in zip(g, gr, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_symmetric_in_its_arguments() -> None:
    torch.manual_seed(1)
    z0, z1 = torch.randn(9, 4), torch.randn(9, 4)
    loss = NTXentLoss(0.2)
    assert loss(z0, z1).item() == pytest.approx(loss(z1, z0).item(), rel=1e-6)


def test_stable_for_large_logits() -> None:
    torch.manual_seed(2)
    z0 = torch.randn(32, 8, requires_grad=True)
    z1 = (z0.detach() + 0.01 * torch.randn(32, 8)).requires_grad_()
    loss = NTXentLoss(1e-3)(z0, z1)  # logits up to 1000
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z0.grad).all()


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        NTXentLoss(0.0)
    with pytest.raises(ValueError):
        NTXentLoss()(torch.randn(3, 4), torch.randn(4, 4))
