"""Optimizers and schedules in plain torch."""

from selfsup.optim.lars import LARS
from selfsup.optim.optimizer import OptimizerSpec

__all__ = ["LARS", "OptimizerSpec"]
