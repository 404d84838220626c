"""Lightning callbacks: the rate scaled by the global batch and warmed up per step, checkpoints
and the random stream for exact resume, guards that stop or warn in words."""

from selfsup.callbacks.checkpoint import (
    AtomicCheckpointIO,
    RandomState,
    RunCheckpoint,
    newest_checkpoint,
    stop_signal,
)
from selfsup.callbacks.guards import CollapseWatch, LossGuard, NonFiniteLoss
from selfsup.callbacks.lr import (
    LearningRateScaling,
    Warmup,
    global_batch_size,
    per_device_batch_size,
)
from selfsup.callbacks.progress import ProgressBar

__all__ = [
    "AtomicCheckpointIO",
    "CollapseWatch",
    "LearningRateScaling",
    "LossGuard",
    "NonFiniteLoss",
    "ProgressBar",
    "RandomState",
    "RunCheckpoint",
    "Warmup",
    "global_batch_size",
    "newest_checkpoint",
    "per_device_batch_size",
    "stop_signal",
]
