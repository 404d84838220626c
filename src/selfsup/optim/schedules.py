"""Learning-rate rules and schedules as pure functions (no Lightning, no optimizer)."""

from __future__ import annotations

import math
from typing import Literal

ScalingRule = Literal["linear", "sqrt", "none"]
Decay = Literal["cosine", "constant"]


def scale_lr(base_lr: float, global_batch: int, reference_batch: int = 256, rule: ScalingRule = "linear") -> float:
    """The rate for ``global_batch`` images per optimizer step, given ``base_lr`` at ``reference_batch``.

    ``linear``: base_lr * global_batch / reference_batch (Goyal et al. 2017, "ImageNet in 1 Hour");
    ``sqrt``: base_lr * sqrt(global_batch / reference_batch) (Krizhevsky 2014; SimCLR's choice for
    small batches); ``none``: base_lr unchanged.
    """
    if global_batch < 1 or reference_batch < 1:
        raise ValueError(
            f"batch sizes must be positive, got global_batch={global_batch}, reference_batch={reference_batch}"
        )
    k = global_batch / reference_batch
    if rule == "linear":
        return base_lr * k
    if rule == "sqrt":
        return base_lr * math.sqrt(k)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}; choose linear, sqrt or none")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int = 0, final_fraction: float = 0.0) -> float:
    """Multiplier of the target rate at optimizer ``step`` (0-based).

    Rises linearly from 0 to 1 over ``warmup_steps`` (Goyal et al. 2017), then follows a
    half cosine from 1 down to ``final_fraction`` at ``total_steps`` (Loshchilov & Hutter 2017).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t))


def lr_factor(
    step: int, total_steps: float, warmup_steps: int = 0, decay: Decay = "cosine", final_fraction: float = 0.0
) -> float:
    """Multiplier of the target rate at optimizer ``step``: linear warmup from 0 over
    ``warmup_steps``, then ``cosine`` decay to ``final_fraction`` at ``total_steps`` or ``constant``.

    A run without a known length (``total_steps`` infinite, e.g. only a time budget) stays
    constant after warmup.
    """
    if decay not in ("cosine", "constant"):
        raise ValueError(f"unknown decay {decay!r}; choose cosine or constant")
    if decay == "constant" or not math.isfinite(total_steps):
        # A cosine that ends where it starts is flat after warmup, whatever its length.
        return warmup_cosine(step, 0, warmup_steps, final_fraction=1.0)
    return warmup_cosine(step, int(total_steps), warmup_steps, final_fraction)
