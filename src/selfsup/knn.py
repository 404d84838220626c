"""Weighted k-nearest-neighbour classification of embeddings (Wu et al. 2018, InstDisc), plain torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_scores(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Class scores of each query from its k most cosine-similar bank entries.

    Each neighbour votes for its class with weight exp(similarity / temperature).

    Args:
        query: (Q, F) features; bank: (N, F) features; bank_labels: (N,) int64.
    Returns:
        (Q, num_classes) non-negative scores; argmax is the prediction.
    """
    q = F.normalize(query.float(), dim=1)
    b = F.normalize(bank.float(), dim=1)
    sim = q @ b.T  # (Q, N)
    k = min(k, b.shape[0])
    top_sim, top_idx = sim.topk(k, dim=1)
    weights = (top_sim / temperature).exp()
    votes = torch.zeros(q.shape[0], num_classes, device=q.device, dtype=weights.dtype)
    return votes.scatter_add_(1, bank_labels[top_idx], weights)
