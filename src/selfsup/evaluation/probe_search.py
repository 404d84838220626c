"""Choosing a linear probe's rate and weight decay on held-out training images, never on the
evaluation split (plain torch, on features computed once).

The peers tune the probe on the split they report (solo-learn and lightly pick their probe rate
by its validation accuracy), which flatters every figure a little. Here a seeded, class-balanced
tenth of the *training* images is held out; one head per setting trains on the rest, all of them
side by side on the same cached features with the same batches and schedule as the final probe,
and the setting whose head classifies the held-out images best is the one the probe trains with.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from selfsup import SelfsupError
from selfsup.config import NON_NEGATIVE, POSITIVE, PlainData, check_range
from selfsup.data.splits import stratified_holdout
from selfsup.optim.optimizer import OptimizerSpec, param_groups


@dataclass(frozen=True)
class ProbeSearch(PlainData):
    """Which settings a linear probe tries before it trains (one typed argument of LinearProbe).

    Args:
        lrs: base rates tried (at the reference batch, as ``optimizer.lr``); empty: no search,
            the probe trains with ``optimizer.lr`` and ``optimizer.weight_decay``.
        weight_decays: tried with every rate.
        holdout: share of each class's training images held out to compare the settings.
        seed: of the held-out draw, the heads' initialization and the batch order.
    """

    lrs: tuple[float, ...] = ()
    weight_decays: tuple[float, ...] = (0.0,)
    holdout: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for lr in self.lrs:
            check_range("model.init_args.search.lrs", lr, POSITIVE)
        for wd in self.weight_decays:
            check_range("model.init_args.search.weight_decays", wd, NON_NEGATIVE)

    @property
    def enabled(self) -> bool:
        return len(self.lrs) > 0

    def settings(self) -> list[tuple[float, float]]:
        """(lr, weight_decay) pairs in grid order (rates outer)."""
        return list(itertools.product(self.lrs, self.weight_decays))


@dataclass
class SearchResult:
    """What the search chose and what it saw: ``table`` holds one ``{"lr", "weight_decay",
    "holdout_top1"}`` per setting; ``fit_images`` / ``holdout_images`` count the training images
    the heads trained on and were compared on."""

    lr: float
    weight_decay: float
    holdout_top1: float
    fit_images: int
    holdout_images: int
    table: list[dict[str, float]] = field(default_factory=list)

    def describe(self) -> str:
        """One line: the choice, and a hint when it lies at an end of the rates tried."""
        line = (
            f"probe search: lr={self.lr!r} weight_decay={self.weight_decay!r} chosen on {self.holdout_images} "
            f"held-out training images (top-1 {100 * self.holdout_top1:.1f}%; {len(self.table)} settings, "
            f"heads trained on {self.fit_images})"
        )
        lrs = sorted({r["lr"] for r in self.table})
        if len(lrs) > 1 and self.lr in (lrs[0], lrs[-1]):
            end = "largest" if self.lr == lrs[-1] else "smallest"
            line += f"; it is the {end} rate tried: search.lrs reaching further may find a better one"
        return line


def fit_heads(
    heads: nn.ModuleList,
    optimizer: torch.optim.Optimizer,
    features: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr_at: Callable[[float, int, int], float] | None = None,
    drop_last: bool = True,
    seed: int = 0,
) -> None:
    """Train linear heads side by side on frozen features: the one loop behind the probe's
    search and the online evaluator's frozen classifier.

    Each epoch visits the rows in a seeded order, ``batch_size`` at a time; the heads' summed
    cross-entropies are minimized together (each head's gradient is its own loss's).

    Args:
        heads: (B, F) -> (B, C) logits each; optimizer: over their parameters.
        features: (N, F) float; labels: (N,) int64.
        lr_at: (group's ``base_lr``, step, total steps) -> the rate of that step; None keeps
            the optimizer's rates.
        drop_last: leave out the last incomplete batch of an epoch, as the probe's loader does.
    """
    batch = min(batch_size, len(features))
    per_epoch = len(features) // batch if drop_last else math.ceil(len(features) / batch)
    total = epochs * per_epoch
    generator = torch.Generator().manual_seed(seed)
    heads.train()
    step = 0
    for _ in range(epochs):
        # A full batch needs no order (and no copy): its rows as they are.
        order = (
            None if batch == len(features) else torch.randperm(len(features), generator=generator).to(features.device)
        )
        for i in range(per_epoch):
            if order is None:
                x, y = features, labels
            else:
                rows = order[i * batch : (i + 1) * batch]
                x, y = features[rows], labels[rows]
            if lr_at is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(group["base_lr"], step, total)
            loss = sum(F.cross_entropy(head(x), y) for head in heads)
            assert isinstance(loss, torch.Tensor)  # one head or more: never the empty sum 0
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1


def search_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    make_head: Callable[[], nn.Module],
    search: ProbeSearch,
    optimizer: OptimizerSpec,
    epochs: int,
    batch_size: int,
    lr_at: Callable[[float, int, int], float],
    drop_last: bool = True,
) -> SearchResult:
    """Train one head per (rate, weight decay) of ``search`` side by side on the fit part of the
    training features and pick the one most accurate on the held-out part.

    Args:
        features: (N, F) frozen features of the training images only; labels: (N,) int64.
        make_head: a fresh head, (B, F) -> (B, C) logits, as the probe builds it (its
            standardization included).
        optimizer: the probe's optimizer; its ``lr`` and ``weight_decay`` are what is searched.
        epochs / batch_size: as the probe will train (``batch_size``: the global batch).
        lr_at: (base rate, step, total steps) -> the rate of that optimizer step, the probe's own
            batch scaling and schedule.
    Returns:
        the chosen setting; ties go to the first in grid order.
    """
    if epochs < 1:
        raise SelfsupError(f"the probe search trains its heads for the probe's epochs, got {epochs}")
    if not 0 < search.holdout < 1:
        raise SelfsupError(f"search.holdout must be in (0, 1), got {search.holdout}")
    fit, held = stratified_holdout(labels, search.holdout, search.seed)
    settings = search.settings()
    device = features.device
    fit_x, fit_y = features[fit.to(device)].float(), labels[fit.to(device)]
    held_x, held_y = features[held.to(device)].float(), labels[held.to(device)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(search.seed)
        heads = nn.ModuleList([make_head() for _ in settings]).to(device)
    groups = []
    for head, (lr, wd) in zip(heads, settings, strict=True):
        for g in param_groups([head], wd):
            groups.append({**g, "lr": lr, "base_lr": lr})
    opt = replace(optimizer, lr=settings[0][0]).build([], groups)
    fit_heads(heads, opt, fit_x, fit_y, epochs, batch_size, lr_at, drop_last, search.seed)
    heads.eval()
    with torch.no_grad():
        accs = [(head(held_x).argmax(1) == held_y).float().mean().item() for head in heads]
    best = max(range(len(settings)), key=lambda j: (accs[j], -j))
    table = [{"lr": lr, "weight_decay": wd, "holdout_top1": a} for (lr, wd), a in zip(settings, accs, strict=True)]
    return SearchResult(
        lr=settings[best][0],
        weight_decay=settings[best][1],
        holdout_top1=accs[best],
        fit_images=len(fit),
        holdout_images=len(held),
        table=table,
    )
