"""Weighted k-nearest-neighbor classification of embeddings (Wu et al. 2018, InstDisc), plain torch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def knn_scores(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    query_chunk: int = 1024,
    bank_chunk: int = 16384,
) -> torch.Tensor:
    """Class scores of each query from its k most cosine-similar bank entries.

    Each neighbor votes for its class with weight exp(similarity / temperature).

    Args:
        query: (Q, F) features; bank: (N, F) features; bank_labels: (N,) int64.
        query_chunk / bank_chunk: work on this many queries against this many bank entries at a
            time, so memory stays at about query_chunk x (bank_chunk + k) similarities however
            large the bank (the whole training split, as the protocol has it).
    Returns:
        (Q, num_classes) non-negative scores; argmax is the prediction.
    """
    return knn_scores_multi(query, bank, bank_labels, num_classes, [k], temperature, query_chunk, bank_chunk)[k]


def knn_scores_multi(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.1,
    query_chunk: int = 1024,
    bank_chunk: int = 16384,
) -> dict[int, torch.Tensor]:
    """:func:`knn_scores` for several k at once (one neighbor search for the largest k):
    ``{k: (Q, num_classes) scores}``."""
    b = F.normalize(bank.float(), dim=1)
    k_max = min(max(ks), b.shape[0])
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for i in range(0, query.shape[0], query_chunk):
        q = F.normalize(query[i : i + query_chunk].float(), dim=1)
        # Running top-k over bank chunks: the best k of (best so far + this chunk).
        best_sim = q.new_empty(q.shape[0], 0)
        best_lab = bank_labels.new_empty(q.shape[0], 0)
        for j in range(0, b.shape[0], bank_chunk):
            sim = q @ b[j : j + bank_chunk].T
            lab = bank_labels[j : j + bank_chunk].expand(q.shape[0], -1)
            sim, lab = torch.cat([best_sim, sim], dim=1), torch.cat([best_lab, lab], dim=1)
            best_sim, idx = sim.topk(min(k_max, sim.shape[1]), dim=1)  # sorted, most similar first
            best_lab = lab.gather(1, idx)
        for k in ks:
            weights = (best_sim[:, :k] / temperature).exp()
            votes = torch.zeros(q.shape[0], num_classes, device=q.device, dtype=weights.dtype)
            out[k].append(votes.scatter_add_(1, best_lab[:, :k], weights))
    return {k: torch.cat(v) if v else query.new_zeros(0, num_classes) for k, v in out.items()}
