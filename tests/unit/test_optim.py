"""LARS and the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from selfsup.optim.lars import LARS
from selfsup.optim.optimizer import OptimizerSpec, param_groups
from selfsup.optim.schedules import warmup_cosine


def test_lars_scales_weights_by_trust_ratio_and_excludes_biases() -> None:
    w = torch.nn.Parameter(torch.full((2, 2), 3.0))
    b = torch.nn.Parameter(torch.ones(2))
    opt = LARS(
        [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
        lr=0.5,
        momentum=0.0,
        eta=0.01,
    )
    w.grad = torch.full((2, 2), 1.0)
    b.grad = torch.full((2,), 2.0)
    opt.step()
    g = 1.0 + 0.1 * 3.0  # gradient plus weight decay
    trust = 0.01 * (4 * 9.0) ** 0.5 / (4 * g * g) ** 0.5
    assert torch.allclose(w, torch.full((2, 2), 3.0 - 0.5 * trust * g))
    assert torch.allclose(b, torch.full((2,), 1.0 - 0.5 * 2.0))  # plain SGD, no decay


def test_param_groups_put_biases_and_norms_in_an_excluded_group() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    groups = param_groups([net], 1e-4)
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lars_exclude"]
    lars = OptimizerSpec("lars", lr=0.1, weight_decay=1e-4).build([net])
    assert isinstance(lars, LARS) and [g["weight_decay"] for g in lars.param_groups] == [1e-4, 0.0]
    adam = OptimizerSpec("adam", lr=0.1).build([net])
    assert all("lars_exclude" not in g for g in adam.param_groups)


def test_warmup_cosine() -> None:
    assert warmup_cosine(0, 100, 10) == 0.0
    assert warmup_cosine(5, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0)
    assert warmup_cosine(0, 100, 0) == 1.0
