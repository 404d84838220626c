"""MoCo v2: queue, momentum update and loss as specified."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from selfsup.evaluation.online import OnlineSpec
from selfsup.methods import MoCo

TINY = {
    "backbone": {"name": "small_cnn", "width": 8},
    "proj_hidden": 16,
    "proj_dim": 4,
    "online": OnlineSpec(enabled=False),
}


def test_queue_is_first_in_first_out_and_wraps() -> None:
    m = MoCo(**TINY, queue_size=10)
    a = F.normalize(torch.randn(4, 4), dim=1)
    b = F.normalize(torch.randn(4, 4), dim=1)
    c = F.normalize(torch.randn(4, 4), dim=1)
    before = m.queue.clone()
    m.enqueue(a)
    assert torch.equal(m.queue[:4], a) and torch.equal(m.queue[4:], before[4:]) and int(m.queue_ptr) == 4
    m.enqueue(b)
    m.enqueue(c)  # 12 keys into 10 slots: c[2:] overwrite the oldest (a[:2])
    assert int(m.queue_ptr) == 2
    assert torch.equal(m.queue[8:], c[:2]) and torch.equal(m.queue[:2], c[2:])
    assert torch.equal(m.queue[2:4], a[2:]) and torch.equal(m.queue[4:8], b)


def test_momentum_update_is_an_exponential_average() -> None:
    m = MoCo(**TINY, key_momentum=0.9)
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    q = dict(m.backbone.named_parameters())
    k_before = {n: p.clone() for n, p in m.key_backbone.named_parameters()}
    m.momentum_update()
    for n, p in m.key_backbone.named_parameters():
        assert torch.allclose(p, 0.9 * k_before[n] + 0.1 * q[n]), n
        assert not p.requires_grad
    assert all(
        torch.equal(a, b)
        for a, b in zip(m.key_backbone.state_dict().values(), m.key_backbone.state_dict().values(), strict=True)
    )


def test_info_nce_matches_reference() -> None:
    m = MoCo(**TINY, queue_size=6, temperature=0.2)
    q = F.normalize(torch.randn(3, 4, dtype=torch.float32), dim=1)
    k = F.normalize(torch.randn(3, 4), dim=1)
    ref = 0.0
    for i in range(3):
        pos = torch.exp(q[i] @ k[i] / 0.2)
        neg = torch.exp(m.queue @ q[i] / 0.2).sum()
        ref += -torch.log(pos / (pos + neg))
    assert m.info_nce(q, k).item() == pytest.approx(ref.item() / 3, rel=1e-5)


def test_training_step_updates_queue_keys_and_not_key_grads() -> None:
    m = MoCo(**TINY, queue_size=32, key_momentum=0.5)
    m.log = lambda *a, **k: None  # no Trainer to log to: the step itself is under test
    m.train()
    imgs = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    key_before = [p.clone() for p in m.key_backbone.parameters()]
    with torch.no_grad():  # the query encoder moves away from the key encoder
        for p in m.backbone.parameters():
            p.add_(0.1)
    loss = m.training_step({"image": imgs, "label": torch.full((8,), -1)}, 0)
    loss.backward()
    assert int(m.queue_ptr) == 8
    assert torch.allclose(m.queue[:8].norm(dim=1), torch.ones(8))
    assert all(p.grad is None for p in m.key_backbone.parameters())
    assert any(p.grad is not None for p in m.backbone.parameters())
    moved = [not torch.equal(a, b) for a, b in zip(key_before, m.key_backbone.parameters(), strict=True)]
    assert all(moved)  # the key encoder followed the query encoder by momentum
    key_after = [p.clone() for p in m.key_backbone.parameters()]
    m.eval()
    m.validation_step({"image": imgs, "label": torch.full((8,), -1)}, 0)  # evaluation leaves queue and keys alone
    assert int(m.queue_ptr) == 8
    assert all(torch.equal(a, b) for a, b in zip(key_after, m.key_backbone.parameters(), strict=True))
