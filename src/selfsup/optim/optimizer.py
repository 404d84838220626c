"""The optimizer of a stage as plain data, and the parameter groups every stage uses."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from selfsup import SelfsupError
from selfsup.config import MOMENTUM, NON_NEGATIVE, PlainData, check_ranges
from selfsup.optim.lars import LARS

OptimizerName = Literal["adam", "adamw", "sgd", "lars"]


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Split parameters so that biases and normalization weights (1-d tensors) get no weight
    decay, as in SimCLR and Goyal et al. (2017)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        # LARS leaves these out of its trust-ratio adaptation too (SimCLR).
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return groups


@dataclass(frozen=True)
class OptimizerSpec(PlainData):
    """The optimizer of a stage, one typed argument of every stage module (stored as a dict).

    ``lr`` is the base rate at the reference batch: the LearningRateScaling and Warmup callbacks
    (selfsup.callbacks) set the rate of every step from it and the trainer's facts. Biases and
    normalization weights get no weight decay (and no LARS adaptation), as in SimCLR.

    Args:
        name: ``adam``, ``adamw``, ``sgd`` (Nesterov when momentum > 0) or ``lars``.
        lr: base learning rate at ``lr_scaling.reference_batch`` images per step.
        weight_decay: L2 penalty of the weights (not of 1-d parameters).
        momentum: of SGD and LARS.
        betas: of Adam and AdamW (MAE: 0.9 and 0.95).
    """

    name: OptimizerName = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        check_ranges(
            "model.init_args.optimizer",
            {
                "lr": (self.lr, NON_NEGATIVE),
                "weight_decay": (self.weight_decay, NON_NEGATIVE),
                "momentum": (self.momentum, MOMENTUM),
                "betas[0]": (self.betas[0], MOMENTUM),
                "betas[1]": (self.betas[1], MOMENTUM),
            },
        )

    def build(self, modules: Iterable[nn.Module], extra_groups: Iterable[dict] = ()) -> torch.optim.Optimizer:
        """The optimizer over the trainable parameters of ``modules``; ``extra_groups`` (e.g. an
        online probe with its own ``lr``) join it."""
        groups = [g for g in param_groups(modules, self.weight_decay) + list(extra_groups) if g["params"]]
        if self.name != "lars":
            # Only LARS knows the exclusion flag.
            groups = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]
        if self.name == "lars":
            return LARS(groups, lr=self.lr, momentum=self.momentum)
        if self.name == "adam":
            return torch.optim.Adam(groups, lr=self.lr, betas=self.betas)
        if self.name == "adamw":
            return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        if self.name == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, nesterov=self.momentum > 0)
        raise SelfsupError(f"unknown optimizer {self.name!r}; choose adam, adamw, sgd or lars")
