"""Figures that describe a representation while it trains (plain torch)."""

from __future__ import annotations

import math

import torch


def embedding_spread(z: torch.Tensor) -> torch.Tensor:
    """How spread out embeddings (B, D) are: the standard deviation over the batch of the
    L2-normalized vectors, averaged over dimensions and times sqrt(D) (lightly's collapse
    measure, scaled): about 1 for vectors spread over the sphere, 0 when all are one vector."""
    z = torch.nn.functional.normalize(z.detach().float(), dim=1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[1])
