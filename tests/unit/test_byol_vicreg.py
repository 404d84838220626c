"""BYOL's and VICReg's losses against lightly's, the momentum schedule, and the target network."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup.evaluation.online import OnlineSpec
from selfsup.losses import VICRegLoss, byol_loss
from selfsup.methods import BYOL, VICReg
from selfsup.models.momentum import cosine_momentum, momentum_update

lightly_loss = pytest.importorskip("lightly.loss")
TINY = {"backbone": {"name": "small_cnn", "width": 8}, "online": OnlineSpec(enabled=False)}


def random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_byol_loss_is_lightlys_negative_cosine_arrangement_in_value_and_gradient() -> None:
    p0, p1 = (random(32, 16, seed=s).requires_grad_() for s in (0, 1))
    z0, z1 = 2.0 * random(32, 16, seed=2), random(32, 16, seed=3)  # any scale: both sides normalized
    ours = byol_loss(p0, p1, z0, z1)
    grads = torch.autograd.grad(ours, [p0, p1])
    # lightly's BYOL example: 0.5 * (ncs(p0, z1) + ncs(p1, z0)) with ncs = -mean cos; on
    # normalized vectors ||p - z||^2 = 2 - 2 cos, so the normalised MSE is 2 + 2 x theirs.
    ncs = lightly_loss.NegativeCosineSimilarity()
    theirs = 2 + 2 * (0.5 * (ncs(p0, z1) + ncs(p1, z0)))
    expected = torch.autograd.grad(theirs, [p0, p1])
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)


def test_byol_loss_takes_no_gradient_into_the_targets() -> None:
    p0, p1, z0, z1 = (random(8, 4, seed=s).requires_grad_() for s in range(4))
    byol_loss(p0, p1, z0, z1).backward()
    assert p0.grad is not None and p1.grad is not None and z0.grad is None and z1.grad is None


@pytest.mark.parametrize("n", [2, 64])
def test_vicreg_loss_equals_lightlys_in_value_and_gradient(n: int) -> None:
    z0, z1 = (random(n, 24, seed=s).requires_grad_() for s in (4, 5))
    ours = VICRegLoss()(z0, z1)
    theirs = lightly_loss.VICRegLoss()(z0, z1)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, [z0, z1]), torch.autograd.grad(theirs, [z0, z1]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_vicreg_terms_by_hand() -> None:
    # Two identical views (no invariance term), unit variance in each dimension, uncorrelated:
    # the loss is 0 up to the eps under the square root.
    z = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]]) * math.sqrt(3 / 4)
    assert float(VICRegLoss()(z, z.clone())) == pytest.approx(0.0, abs=1e-3)
    # Collapse (every row alike): the variance hinge is 1 in every dimension, times 25.
    same = torch.ones(4, 3)
    assert float(VICRegLoss()(same, same)) == pytest.approx(25 * (1 - math.sqrt(1e-4)))
    with pytest.raises(ValueError, match="at least 2 images"):
        VICRegLoss()(torch.ones(1, 3), torch.ones(1, 3))


def test_the_momentum_rises_on_a_cosine_from_its_base_to_one() -> None:
    assert cosine_momentum(0, 1000, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(500, 1000, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(1000, 1000, 0.99) == pytest.approx(1.0)
    assert cosine_momentum(250, 1000, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
    steps = [cosine_momentum(k, 100, 0.9) for k in range(101)]
    assert steps == sorted(steps)  # never falls


def test_momentum_update_moves_weights_and_batchnorm_statistics() -> None:
    online, target = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        online.weight.fill_(2.0)
        online.running_mean.fill_(1.0)
        online.num_batches_tracked.fill_(7)
    momentum_update([online], [target], 0.75)
    assert torch.allclose(target.weight, torch.full((3,), 0.75 * 1 + 0.25 * 2))
    assert torch.allclose(target.running_mean, torch.full((3,), 0.25))
    assert int(target.num_batches_tracked) == 7


def test_the_byol_target_receives_no_gradient_and_starts_as_the_online_network() -> None:
    m = BYOL(**TINY, proj_hidden=16, proj_dim=8, pred_hidden=16)
    online = dict(m.backbone.state_dict()) | {f"p.{k}": v for k, v in m.projector.state_dict().items()}
    target = dict(m.target_backbone.state_dict()) | {f"p.{k}": v for k, v in m.target_projector.state_dict().items()}
    assert all(torch.equal(online[k], target[k]) for k in online)
    v0, v1 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss, features, z = m.loss(v0, v1)
    loss.backward()
    assert all(p.grad is None for p in [*m.target_backbone.parameters(), *m.target_projector.parameters()])
    assert all(p.grad is not None for p in m.predictor.parameters())
    assert features.shape == (4, m.backbone.num_features) and z.shape == (4, 8)
    optimized = {id(p) for g in m.configure_optimizers().param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in [*m.target_backbone.parameters(), *m.target_projector.parameters()]}


def test_vicreg_expander_is_three_layers_four_times_the_features_by_default() -> None:
    m = VICReg(**TINY)

    def widths(model: VICReg) -> list[int]:
        return [layer.out_features for layer in model.expander if isinstance(layer, torch.nn.Linear)]

    assert widths(m) == [4 * m.backbone.num_features] * 3
    assert widths(VICReg(**TINY, expander_dim=32)) == [32] * 3
