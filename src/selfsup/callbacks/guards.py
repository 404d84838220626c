"""Guards that stop or warn in words when training goes wrong: a non-finite loss, a GPU out of
memory, a representation that collapsed."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from selfsup import SelfsupError
from selfsup.callbacks.checkpoint import newest_checkpoint
from selfsup.callbacks.lr import per_device_batch_size


class NonFiniteLoss(SelfsupError):
    """The loss became NaN or infinite."""


class LossGuard(L.Callback):
    """Stop at the first non-finite loss, before it reaches the weights, with one line naming the
    step, the rate and the likely fix; the last checkpoint on disk is the last good state. A
    CUDA out-of-memory error also ends in one line: the batch per device and how to shrink it
    without changing the run (the global batch, and so the rate, stay with accumulation)."""

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        # Decided together under DDP: a rank stopping alone would leave the others waiting.
        if not trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss).all()), all=False):
            return
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        last = newest_checkpoint(trainer.default_root_dir) if trainer.default_root_dir else None
        raise NonFiniteLoss(
            f"the loss is {float(loss.detach().float().reshape(-1)[0])} at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}, lr {lr:.4g}): the rate is likely too high for this batch and "
            "model; lower optimizer.lr, lengthen warmup.warmup_epochs, or check the data for broken values"
            + (f"; the last good checkpoint is {last}" if last is not None else "")
        )

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, torch.OutOfMemoryError):
            return
        try:
            batch: int | None = per_device_batch_size(trainer)
        except SelfsupError:  # no loader to read it from
            batch = None
        per_device = f"{batch} images per device" if batch else "the batch per device"
        half = (
            f"--data.batch_size {batch // 2} --trainer.accumulate_grad_batches {2 * trainer.accumulate_grad_batches}"
            if batch and batch > 1
            else "a smaller --data.batch_size with a larger --trainer.accumulate_grad_batches"
        )
        raise SelfsupError(
            f"out of GPU memory at step {trainer.global_step} with {per_device}: {half} keeps the global batch "
            "(and so the scaled rate); or a smaller backbone or image size"
        ) from exception


#: The RankMe keys ``selfsup.evaluation.online.RankMeMonitor`` logs (by the split it measures on).
RANKME_KEYS = ("val/rankme", "train/rankme")


class CollapseWatch(L.Callback):
    """Warn once, in words, when the logged ``train/embedding_spread`` falls below ``threshold``
    (every image embedded alike: the contrastive task has nothing left to learn from); and once
    when the epoch's RankMe (``val/rankme`` or ``train/rankme``, the effective rank of the features
    of fixed images) falls to ``rank_threshold`` or below (every image embedded on about one line).

    Args:
        threshold: the spread below which the representation counts as collapsed.
        after_steps: ignore the first steps (a fresh network may start narrow).
        rank_threshold: the RankMe at or below which the features count as collapsed. 1.5: one
            direction holds about 85% or more of the singular values' mass (p = [0.85, 0.15] gives
            exp(H) = 1.53). Absolute, not a share of min(N, D): RankMe does not center, so the mean
            direction of non-negative (ReLU, pooled) features dominates a healthy, even a random,
            network's spectrum, and 1% of 1024 images (about 10) would warn about runs that are
            fine; no healthy representation puts all images on one line.
    """

    def __init__(self, threshold: float = 0.05, after_steps: int = 10, rank_threshold: float = 1.5) -> None:
        self.threshold, self.after_steps, self.rank_threshold = threshold, after_steps, rank_threshold
        self.warned = False
        self.warned_rank = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        spread = trainer.callback_metrics.get(
            "train/embedding_spread_step", trainer.callback_metrics.get("train/embedding_spread")
        )
        if self.warned or spread is None or trainer.global_step < self.after_steps:
            return
        if float(spread) < self.threshold:
            self.warned = True
            rank_zero_warn(
                f"the representation collapsed at step {trainer.global_step}: train/embedding_spread is "
                f"{float(spread):.3f} (about 1 when images embed apart, 0 when all embed alike), so the loss "
                "cannot fall further; usual causes: a rate far too high (lower optimizer.lr or warm up longer), "
                "too weak augmentation, or a temperature far too high"
            )

    # RankMe is logged at the end of each epoch by the module's own callbacks, which run after the
    # trainer's (this one): read it when the next epoch starts, and after the last.
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check_rank(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check_rank(trainer)

    def check_rank(self, trainer: L.Trainer) -> None:
        """Warn once when the last logged RankMe is at or below ``rank_threshold``."""
        key = next((k for k in RANKME_KEYS if k in trainer.callback_metrics), None)
        if self.warned_rank or key is None:
            return
        rank = float(trainer.callback_metrics[key])
        if rank <= self.rank_threshold:
            self.warned_rank = True
            dims = max(1, round(rank))
            # Every rank holds the same synced value, so none decides alone; rank zero says it.
            rank_zero_warn(
                f"the representation collapsed after {trainer.current_epoch} epoch"
                f"{'' if trainer.current_epoch == 1 else 's'}: {key} is {rank:.2f}, so the features of "
                f"every image span about {dims} dimension{'' if dims == 1 else 's'} (1: all on one line) and "
                "carry almost nothing to tell images apart; usual causes: a rate far too high (lower optimizer.lr "
                "or warm up longer), too weak augmentation, a temperature far too high, or a loss with nothing "
                "that keeps images apart (no negatives, no variance term)"
            )
