"""NT-Xent, the normalized temperature-scaled cross-entropy of SimCLR (Chen et al. 2020, eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.distributed import gather_with_grad, rank


class NTXentLoss(nn.Module):
    """SimCLR loss over the global batch.

    For N images with two views each, every one of the 2N embeddings has one positive
    (the other view of its image) and 2N - 2 negatives (all other embeddings):

        l(i, j) = -log( exp(s_ij / t) / sum_{k != i} exp(s_ik / t) ),  s = cosine similarity
        L = 1 / (2N) * sum_k [ l(k, k') + l(k', k) ]

    Under DDP the columns (candidates) are gathered from every rank with a gather whose
    backward sums gradients over ranks, while each rank computes only its own rows. Each
    rank returns the mean over its rows; DDP's gradient averaging then yields exactly the
    gradient of the global-batch loss. Computed with log-softmax, so large logits (small
    temperatures) are stable.

    Args:
        temperature: t > 0.

    Shapes:
        z0, z1: (n, D) embeddings of the two views of the n local images (row i of z0 and
        row i of z1 come from the same image). Returns a scalar.
    """

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        if z0.shape != z1.shape or z0.dim() != 2:
            raise ValueError(f"expected two (N, D) tensors of one shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
        with torch.autocast(z0.device.type, enabled=False):
            # Similarities in fp32 even under mixed precision: logits reach 1/temperature.
            low = (torch.float16, torch.bfloat16)
            return self._loss(z0.float() if z0.dtype in low else z0, z1.float() if z1.dtype in low else z1)

    def _loss(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        n = z0.shape[0]
        z0 = F.normalize(z0, dim=1)
        z1 = F.normalize(z1, dim=1)
        # Columns: [all views 0 of the global batch, all views 1], each (N_global, D).
        g0, g1 = gather_with_grad(z0), gather_with_grad(z1)
        big_n = g0.shape[0]
        cols = torch.cat([g0, g1], dim=0)  # (2N, D)
        rows = torch.cat([z0, z1], dim=0)  # (2n, D)
        logits = rows @ cols.T / self.temperature  # (2n, 2N)

        offset = rank() * n
        local = torch.arange(n, device=z0.device) + offset
        self_idx = torch.cat([local, local + big_n])  # where each row meets itself
        pos_idx = torch.cat([local + big_n, local])  # where each row meets its other view
        row_ids = torch.arange(2 * n, device=z0.device)
        # A row never counts itself among its candidates.
        logits = logits.index_put((row_ids, self_idx), logits.new_tensor(float("-inf")))
        return F.cross_entropy(logits, pos_idx)
