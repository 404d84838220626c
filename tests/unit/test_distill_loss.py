"""Distillation's loss against lightly's counterpart and a hand computation, and its mixup."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup.methods.distill import distillation_loss, mixup

# lightly has no distillation loss (lightly-train's lives in that package, not installed); the
# closest is SimSiam's negative cosine similarity: on normalized vectors ||s - t||^2 = 2 - 2 cos.
NegativeCosineSimilarity = pytest.importorskip("lightly.loss").NegativeCosineSimilarity


def test_value_and_gradient_match_lightly_negative_cosine_similarity() -> None:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(16, 64, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = 3.0 * torch.randn(16, 64, generator=g, dtype=torch.float64)  # any scale: both sides normalized
    ours = distillation_loss(student, teacher)
    (grad_ours,) = torch.autograd.grad(ours, student)
    ref = 2 + 2 * NegativeCosineSimilarity()(student, teacher)
    (grad_ref,) = torch.autograd.grad(ref, student)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_ours.double(), grad_ref, rtol=1e-5, atol=1e-7)


def test_hand_computed_values() -> None:
    # Row 0 aligned up to scale (0), row 1 at a right angle (2), row 2 opposite (4): mean 2.
    s = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    t = torch.tensor([[5.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert float(distillation_loss(s, t)) == pytest.approx(2.0)
    # 45 degrees: 2 - 2 cos(pi / 4); the teacher side takes no gradient (it is a constant target).
    s = torch.tensor([[1.0, 1.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0]], requires_grad=True)
    loss = distillation_loss(s, t.detach())
    assert float(loss) == pytest.approx(2 - 2 * math.cos(math.pi / 4))
    loss.backward()
    assert s.grad is not None and t.grad is None
    # d/ds (2 - 2 cos) = -2 (t/|t| - cos s/|s|) / |s| = -2 ((1, 0) - (1/2, 1/2)) / sqrt(2) at s = (1, 1), t = (1, 0).
    torch.testing.assert_close(s.grad, torch.tensor([[-1.0, 1.0]]) / math.sqrt(2))


def test_half_precision_inputs_give_an_fp32_loss() -> None:
    s, t = torch.randn(4, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    loss = distillation_loss(s, t)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, distillation_loss(s.float(), t.float()))


def test_mixup_blends_each_image_with_another_of_the_batch() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    mixed, lam, perm = mixup(x)
    assert 0 <= float(lam) <= 1 and sorted(perm.tolist()) == list(range(8))
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
