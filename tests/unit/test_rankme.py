"""RankMe (Garrido et al., ICML 2023) against its closed form on embeddings of known spectrum."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup.metrics import rankme


def _with_singular_values(sigma: list[float], n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Embeddings (n, d) whose singular values are ``sigma`` (then zeros): U diag(sigma) V^T with
    random orthonormal U (n, k) and V (d, k)."""
    g = torch.Generator().manual_seed(seed)
    k = len(sigma)
    u = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]
    return u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ v.T


def _closed_form(p: list[float], eps: float = 1e-7, zeros: int = 0) -> float:
    """exp(entropy) of p_k + eps, with ``zeros`` singular values of 0 (p = eps each)."""
    q = [x + eps for x in p] + [eps] * zeros
    return math.exp(-sum(x * math.log(x) for x in q))


def test_full_rank_with_equal_singular_values_is_the_dimension() -> None:
    d = 16
    z = 3.0 * torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(1)))[0]  # orthogonal rows
    assert rankme(z) == pytest.approx(d, abs=1e-4)
    assert rankme(z) == pytest.approx(_closed_form([1 / d] * d), rel=1e-6)
    # Without eps it is exactly the dimension; eps lifts it by about d * eps * log(d) at most.
    assert rankme(z, eps=0.0) == pytest.approx(d, rel=1e-9)


def test_rank_one_and_zero_embeddings_are_one() -> None:
    constant = torch.full((32, 8), 0.7)  # every image embedded alike
    assert rankme(constant) == pytest.approx(1.0, abs=1e-4)
    assert rankme(constant, eps=0.0) == pytest.approx(1.0, abs=1e-9)
    assert rankme(_with_singular_values([5.0], 20, 10)) == pytest.approx(1.0, abs=1e-4)
    assert rankme(torch.zeros(4, 3)) == pytest.approx(1.0, abs=1e-4)


def test_in_between_matches_the_entropy_by_hand() -> None:
    # Singular values [3, 1, 0, 0]: p = [0.75, 0.25, 0, 0] (+ eps), exp(H) = 1.7548...
    z = _with_singular_values([3.0, 1.0], n=6, d=4)
    expected = _closed_form([0.75, 0.25], zeros=2)
    assert expected == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), abs=1e-5)
    assert rankme(z) == pytest.approx(expected, rel=1e-9)
    assert 1.0 < rankme(z) < 2.0


def test_invariant_to_rotation_and_scale_and_bounded() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(50, 12, generator=g) @ torch.diag(torch.linspace(0.1, 4.0, 12))
    q = torch.linalg.qr(torch.randn(12, 12, generator=g))[0]
    r = rankme(z)
    assert rankme(z @ q) == pytest.approx(r, rel=1e-6)  # rotating the feature space
    assert rankme(z.T) == pytest.approx(r, rel=1e-6)  # the transpose: the same singular values
    assert rankme(1e-3 * z) == pytest.approx(r, rel=1e-6) and rankme(1e4 * z) == pytest.approx(r, rel=1e-6)
    assert 1.0 <= r <= 12 + 1e-4
    # Fewer images than dimensions: the rank is bounded by N.
    assert rankme(torch.randn(5, 64, generator=g)) <= 5 + 1e-4


def test_float64_and_shape_checks() -> None:
    # Half-precision features give the rank of their float64 copy (no float16 SVD).
    z = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    assert rankme(z.half()) == pytest.approx(rankme(z.half().double()), rel=1e-12)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        rankme(torch.randn(3, 4, 5))
