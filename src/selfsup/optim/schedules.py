"""Learning-rate schedules as pure functions of the optimizer step."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int = 0, final_fraction: float = 0.0) -> float:
    """Multiplier of the base rate at optimizer ``step`` (0-based).

    Rises linearly from 0 to 1 over ``warmup_steps`` (Goyal et al. 2017), then follows a
    half cosine from 1 down to ``final_fraction`` at ``total_steps`` (Loshchilov & Hutter 2017).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t))
