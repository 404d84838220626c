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


def evaluation_due(epoch: int, max_epochs: int | None, every: int) -> bool:
    """Whether epoch ``epoch`` (0-based) evaluates: every ``every`` epochs and on the last;
    never when ``every`` <= 0."""
    if every <= 0:
        return False
    return (epoch + 1) % every == 0 or (max_epochs is not None and epoch + 1 >= max_epochs)


@torch.no_grad()
def embed_all(embed: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, device: torch.device,
              batch_size: int = 512) -> torch.Tensor:
    """Features of uint8 images (N, 3, H, W) in batches on ``device``: float (N, F)."""
    return torch.cat([embed(images[i : i + batch_size].to(device)).float() for i in range(0, len(images), batch_size)])


def frozen_evaluation(
    embed: Callable[[torch.Tensor], torch.Tensor],
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    eval_images: torch.Tensor,
    eval_labels: torch.Tensor,
    num_classes: int,
    device: torch.device,
    knn_k: int = 200,
    knn_temperature: float = 0.1,
    linear_steps: int = 300,
    seed: int = 0,
) -> dict[str, float]:
    """Evaluate a frozen backbone on labelled data that it was not trained on: weighted kNN
    (InstDisc: cosine, k=200, t=0.1, the whole training split as the bank) and a linear
    classifier fitted on standardised features (full-batch Adam, seeded).

    Used when the pretraining images have no labels and labelled evaluation data are given
    separately, so that no head can train alongside the pretext loss.

    Args:
        embed: uint8 (B, 3, H, W) on ``device`` -> features (B, F), in eval mode.
        train_*/eval_*: uint8 images (N, 3, H, W) and int64 labels (N,).
    Returns:
        ``knn_top1`` and ``linear_top1`` as fractions.
    """
    train = embed_all(embed, train_images, device)
    test = embed_all(embed, eval_images, device)
    ytr, yte = train_labels.to(device), eval_labels.to(device)
    correct = 0
    for i in range(0, len(test), 1024):  # chunks of queries: the similarity matrix stays small
        scores = knn_scores(test[i : i + 1024], train, ytr, num_classes, knn_k, knn_temperature)
        correct += int((scores.argmax(1) == yte[i : i + 1024]).sum())
    # Validation runs under inference mode: fit the classifier on ordinary (cloned) tensors.
    with torch.inference_mode(False), torch.enable_grad():
        train, test = train.clone(), test.clone()
        mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
        train, test = (train - mean) / std, (test - mean) / std
        g = torch.Generator(device="cpu").manual_seed(seed)
        head = nn.Linear(train.shape[1], num_classes).to(device)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
            head.bias.zero_()
        opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(linear_steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(head(train), ytr.clone()).backward()
            opt.step()
        with torch.no_grad():
            linear = float((head(test).argmax(1) == yte).float().mean())
    return {"knn_top1": correct / max(1, len(test)), "linear_top1": linear}


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
        self.train_top1 = MulticlassAccuracy(num_classes, average="micro")
        self.online_top1 = MulticlassAccuracy(num_classes, average="micro")
        self.knn_top1 = MulticlassAccuracy(num_classes, average="micro")
        self.knn_every, self.knn_k, self.knn_t, self.knn_bank_size = knn_every, knn_k, knn_temperature, knn_bank_size
        self._bank: tuple[torch.Tensor, torch.Tensor] | None = None

    def train_loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the head on detached features; accumulates ``train_top1``."""
        logits = self.head(features.detach().float())
        self.train_top1.update(logits.detach(), labels)
        return F.cross_entropy(logits, labels)

    def knn_due(self, epoch: int, max_epochs: int | None) -> bool:
        return evaluation_due(epoch, max_epochs, self.knn_every)

    @torch.no_grad()
    def build_bank(self, embed: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                   labels: torch.Tensor, device: torch.device, batch_size: int = 512) -> None:
        """Features of (a fixed subset of) the training images: the kNN bank. ``embed`` maps a
        uint8 batch on ``device`` to features."""
        if len(images) > self.knn_bank_size:
            idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[: self.knn_bank_size]
            images, labels = images[idx], labels[idx]
        self._bank = (embed_all(embed, images, device, batch_size), labels.to(device))

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
