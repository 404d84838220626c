"""Momentum (EMA) copies of networks: MoCo's key encoder, BYOL's target (He et al. 2020;
Grill et al. 2020). Plain torch."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that follows it by :func:`momentum_update`, never by gradient."""
    return copy.deepcopy(module).requires_grad_(False)


@torch.no_grad()
def momentum_update(online: Sequence[nn.Module], target: Sequence[nn.Module], m: float) -> None:
    """``target = m * target + (1 - m) * online`` for every floating weight and buffer (BatchNorm
    statistics move the same way); integer buffers (BatchNorm's batch count) are copied.

    Args:
        online / target: modules of the same architecture, paired in order.
        m: the momentum in [0, 1]; 1 leaves the target as it is.
    """
    for o_mod, t_mod in zip(online, target, strict=True):
        for o, t in zip(o_mod.state_dict().values(), t_mod.state_dict().values(), strict=True):
            if t.dtype.is_floating_point:
                t.mul_(m).add_(o.detach(), alpha=1 - m)
            else:
                t.copy_(o)


def cosine_momentum(step: int, total_steps: float, base: float, final: float = 1.0) -> float:
    """BYOL's schedule (Grill et al. 2020, section 3.2): ``final - (final - base) * (cos(pi k / K) + 1) / 2``
    at step k of K: ``base`` at the first step, ``final`` at the last. A function of the step alone,
    so a resumed run continues the schedule where it stopped."""
    progress = min(max(step / max(total_steps, 1.0), 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2
