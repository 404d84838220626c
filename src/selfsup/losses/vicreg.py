"""VICReg's loss: variance, invariance and covariance (Bardes, Ponce and LeCun, ICLR 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.distributed import gather_with_grad


class VICRegLoss(nn.Module):
    """``invariance_weight * MSE(z0, z1) + variance_weight * (v(z0) + v(z1)) / 2 +
    covariance_weight * (c(z0) + c(z1))`` with the hinge on each dimension's standard deviation
    ``v(z) = mean_d relu(1 - sqrt(Var z_d + eps))`` and the squared off-diagonal covariances
    ``c(z) = sum_{i != j} Cov(z)_ij^2 / D`` (the paper's eq. 1-6; weights 25, 25, 1).

    Under DDP every term runs over the global batch: the embeddings are gathered from every
    rank with a gather whose backward sums gradients over ranks, so every rank computes the same
    loss and DDP's averaging gives the gradient of the global-batch loss.

    Shapes: z0, z1 (n, D), the expander's outputs of the two views of the local images -> a scalar.
    """

    def __init__(
        self,
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        covariance_weight: float = 1.0,
        eps: float = 1e-4,
    ) -> None:
        super().__init__()
        self.invariance_weight, self.variance_weight, self.covariance_weight = (
            invariance_weight,
            variance_weight,
            covariance_weight,
        )
        self.eps = eps

    def forward(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        if z0.shape != z1.shape or z0.dim() != 2:
            raise ValueError(f"expected two (N, D) tensors of one shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
        with torch.autocast(z0.device.type, enabled=False):
            # Variances and covariances in fp32 even under mixed precision.
            z0 = gather_with_grad(z0 if z0.dtype == torch.float64 else z0.float())
            z1 = gather_with_grad(z1 if z1.dtype == torch.float64 else z1.float())
            if z0.shape[0] < 2:
                raise ValueError("VICReg needs at least 2 images in the (global) batch for its variances")
            invariance = F.mse_loss(z0, z1)
            variance = (self.variance(z0) + self.variance(z1)) / 2
            covariance = self.covariance(z0) + self.covariance(z1)
            return (
                self.invariance_weight * invariance
                + self.variance_weight * variance
                + self.covariance_weight * covariance
            )

    def variance(self, z: torch.Tensor) -> torch.Tensor:
        """The hinge on each dimension's standard deviation: (N, D) -> scalar."""
        return F.relu(1 - torch.sqrt(z.var(dim=0) + self.eps)).mean()

    @staticmethod
    def covariance(z: torch.Tensor) -> torch.Tensor:
        """Squared off-diagonal covariances over the batch, divided by D: (N, D) -> scalar."""
        n, d = z.shape
        z = z - z.mean(dim=0)
        cov = z.T @ z / (n - 1)
        return (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / d
