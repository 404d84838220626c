"""InfoNCE against a queue of negatives, MoCo's loss (He et al. 2020; van den Oord et al. 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over queries of ``-log( exp(q.k+ / t) / (exp(q.k+ / t) + sum_j exp(q.k_j / t)) )``.

    Args:
        q: (B, D) L2-normalized queries; k: (B, D) their positive keys (normalized), row by row.
        queue: (K, D) normalized negatives (no gradient flows into them).
        temperature: t > 0 (MoCo v2: 0.2).
    Returns:
        a scalar; the positive sits in column 0 of the (B, 1 + K) logits.
    """
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ queue.clone().detach().T
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
