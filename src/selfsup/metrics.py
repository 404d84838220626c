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


def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido, Balestriero, Najman and LeCun, "RankMe: Assessing the downstream
    performance of pretrained self-supervised representations by their rank", ICML 2023): the
    effective rank of embeddings z (N, D), exp(-sum_k p_k log p_k) with p_k = sigma_k / ||sigma||_1
    + eps over the min(N, D) singular values sigma of z.

    It lies in [1, min(N, D)] (up to eps): min(N, D) when every direction carries as much, 1 when
    all images embed on one line (a constant representation). It needs no labels, and higher
    tracks better downstream accuracy within a method. No centering, as in the paper; invariant
    to rotations and to the scale of z.
    """
    if z.ndim != 2 or min(z.shape) == 0:
        raise ValueError(f"rankme needs embeddings (N, D) with N, D >= 1, got shape {tuple(z.shape)}")
    # float64: the small singular values of a nearly collapsed representation are the ones that
    # decide the rank, and float32 rounds them into noise (MPS has no float64: there on the CPU).
    z = z.detach().cpu() if z.device.type == "mps" else z.detach()
    sigma = torch.linalg.svdvals(z.to(torch.float64))
    p = sigma / sigma.sum().clamp_min(torch.finfo(torch.float64).tiny) + eps
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))  # xlogy: 0 log 0 = 0 when eps is 0
