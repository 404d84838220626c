"""Which images a split holds: the decoded set, seeded held-out splits, subsets and label fractions.

Every draw takes an explicit seed, so that every stage, process and re-run sees the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from selfsup import SelfsupError
from selfsup.protocols import LazyRows


@dataclass
class ImageSet:
    """Decoded images of one split. images: uint8 (N, 3, H, W), or a streamed split's
    ``LazyImages`` that decode when read; labels: int64 (N,), -1 when the images have no
    labels; classes: the class names (empty without labels)."""

    # Typed as the tensor that a LazyImages stands in for (it is indexed like one).
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def labeled(self) -> bool:
        return len(self.classes) > 0

    def subset(self, idx: torch.Tensor) -> ImageSet:
        # Streamed images (selfsup.data.litdata.dataset.LazyImages) stay undecoded, indexed like a tensor.
        images = cast(torch.Tensor, self.images.subset(idx)) if isinstance(self.images, LazyRows) else self.images[idx]
        return ImageSet(images, self.labels[idx], self.classes)


def held_out_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) of ``n`` items: a seeded permutation, the first ``round(fraction x n)``
    (at least one) held out. Both parts keep the permutation's order, so that taking the first
    ``k`` of a part is a seeded random subset of it."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = max(1, round(fraction * n))
    return perm[n_held:], perm[:n_held]


def seeded_subset(n: int, k: int | None, seed: int) -> torch.Tensor | None:
    """Sorted indices of a seeded random subset of ``k`` of ``n`` items (None: keep all)."""
    if k is None or k >= n:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values


def label_fraction_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of a class-balanced, seeded share of labeled images: per class,
    ``round(fraction x its images)`` (at least one) drawn at random with ``seed``; the same
    indices for the same labels, fraction and seed (the semi-supervised protocol: SimCLR's 1% and
    10% of ImageNet's labels)."""
    if not 0 < fraction <= 1:
        raise SelfsupError(f"label_fraction must be in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels.unique(sorted=True).tolist():
        members = (labels == c).nonzero().flatten()
        keep = max(1, round(fraction * len(members)))
        picked.append(members[torch.randperm(len(members), generator=g)[:keep]])
    return torch.cat(picked).sort().values


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) sorted indices: per class a seeded share ``fraction`` (at least one
    image) held out (:func:`label_fraction_subset`), the rest kept."""
    if not 0 < fraction < 1:
        raise SelfsupError(f"a holdout must be a share in (0, 1) of each class, got {fraction}")
    held = label_fraction_subset(labels.cpu(), fraction, seed)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held] = False
    return mask.nonzero().flatten(), held
