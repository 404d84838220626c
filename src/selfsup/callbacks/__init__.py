"""Lightning callbacks: learning-rate scaling by the global batch, warmup then decay."""

from selfsup.callbacks.lr import (
    LearningRateScaling,
    Warmup,
    global_batch_size,
    per_device_batch_size,
)

__all__ = ["LearningRateScaling", "Warmup", "global_batch_size", "per_device_batch_size"]
