"""BYOL's loss: the normalised mean squared error between the online network's predictions and
the target's projections, symmetrised over the two views (Grill et al. 2020, eq. 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``|| p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z)``; (B, D), (B, D) -> scalar.
    ``z`` is a target: no gradient flows into it."""
    with torch.autocast(p.device.type, enabled=False):
        p, z = F.normalize(p.float(), dim=1), F.normalize(z.detach().float(), dim=1)
        return (2 - 2 * (p * z).sum(dim=1)).mean()


def byol_loss(p0: torch.Tensor, p1: torch.Tensor, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """Each view's prediction against the other view's target projection, averaged over the
    two directions (the paper sums them; the mean keeps the scale of one direction).

    Shapes: predictions p0, p1 and target projections z0, z1, all (B, D) -> a scalar in [0, 4].
    """
    return (normalized_mse(p0, z1) + normalized_mse(p1, z0)) / 2
