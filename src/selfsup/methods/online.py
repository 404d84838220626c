"""Online evaluation inside a pretraining module: a linear head on detached features, trained by
the module's own optimiser alongside the self-supervised loss, and a kNN monitor.

Both live in the LightningModule (not in a callback with its own optimiser), so they follow
the module through DDP (the head is part of the DDP-wrapped module; metrics sync through
torchmetrics) and through checkpoints and resume (the head's weights and optimiser state are
saved with everything else; the kNN bank is rebuilt from the training images when needed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from selfsup.knn import knn_scores


class OnlineEvaluator(nn.Module):
    """Linear head plus kNN monitor for a backbone with ``num_features`` outputs.

    Args:
        knn_every: build the kNN bank and score the validation split every this many epochs
            (and on the last epoch); 0 turns kNN off.
        knn_k / knn_temperature: InstDisc's weighted kNN (k=200, t=0.1).
        knn_bank_size: at most this many training images (a fixed subset) in the bank.
    """

    def __init__(self, num_features: int, num_classes: int, knn_every: int = 5, knn_k: int = 200,
                 knn_temperature: float = 0.1, knn_bank_size: int = 10000) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.head = nn.Sequential(nn.BatchNorm1d(num_features, affine=False), nn.Linear(num_features, num_classes))
        self.online_top1 = MulticlassAccuracy(num_classes, average="micro")
        self.knn_top1 = MulticlassAccuracy(num_classes, average="micro")
        self.knn_every, self.knn_k, self.knn_t, self.knn_bank_size = knn_every, knn_k, knn_temperature, knn_bank_size
        self._bank: tuple[torch.Tensor, torch.Tensor] | None = None

    def train_loss(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of the head on detached features: (loss, accuracy)."""
        logits = self.head(features.detach().float())
        return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean()

    def knn_due(self, epoch: int, max_epochs: int | None) -> bool:
        if self.knn_every <= 0:
            return False
        return (epoch + 1) % self.knn_every == 0 or (max_epochs is not None and epoch + 1 >= max_epochs)

    @torch.no_grad()
    def build_bank(self, embed: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                   labels: torch.Tensor, device: torch.device, batch_size: int = 512) -> None:
        """Features of (a fixed subset of) the training images: the kNN bank. ``embed`` maps a
        uint8 batch on ``device`` to features."""
        if len(images) > self.knn_bank_size:
            idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[: self.knn_bank_size]
            images, labels = images[idx], labels[idx]
        feats = [embed(images[i : i + batch_size].to(device)).float() for i in range(0, len(images), batch_size)]
        self._bank = (torch.cat(feats), labels.to(device))

    @property
    def has_bank(self) -> bool:
        """Whether a kNN bank was built for this validation epoch."""
        return self._bank is not None

    def clear_bank(self) -> None:
        self._bank = None

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Accumulate validation accuracy of the head, and of kNN when a bank was built."""
        self.online_top1.update(self.head(features.float()), labels)
        if self._bank is not None:
            bank, bank_labels = self._bank
            scores = knn_scores(features, bank, bank_labels, self.num_classes, self.knn_k, self.knn_t)
            self.knn_top1.update(scores, labels)
