"""Runs that survive: checkpoints written often and atomically, exact resume, guards that stop or
warn in words when training goes wrong.

A resumed run is the same run: weights, optimiser, the rate's callbacks, the online evaluator
and MoCo's queue come back with the checkpoint (Lightning); the data order continues from the
middle of the epoch (``selfsup.data.resumable``); and :class:`RandomState` restores the random
stream the augmentations draw from, so that on the CPU the resumed run ends with the same
weights, bit for bit, as one that never stopped.
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from selfsup import SelfsupError
from selfsup.callbacks.lr import per_device_batch_size

LAST = "last.ckpt"


class RunCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt`` in the run folder, written at every epoch end and every
    ``every_n_steps`` optimiser steps or ``every_minutes`` of training, whichever is given
    (default: at most 10 minutes of work lost). Lightning writes it atomically (a temporary file
    moved into place), so a kill while writing leaves the previous ``last.ckpt`` intact.

    Args:
        every_minutes: save this often during an epoch; None: only at epoch ends (or steps).
        every_n_steps: save every this many optimiser steps instead of by time.
    """

    def __init__(self, every_minutes: float | None = 10.0, every_n_steps: int | None = None) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise SelfsupError(f"checkpoint.every_n_steps must be 1 or more, got {every_n_steps}")
        interval = timedelta(minutes=every_minutes) if every_minutes and every_n_steps is None else None
        super().__init__(filename="last", save_top_k=0, save_last=True, enable_version_counter=False,
                         every_n_train_steps=every_n_steps, train_time_interval=interval)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Time and step triggers switch Lightning's epoch-end saving off; an epoch end is always
        # a point worth keeping (after its validation, which runs before this hook).
        super().on_train_epoch_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # SIGTERM (preemption): Lightning stops after the current step; keep that step.
        if not isinstance(exception, SIGTERMException):
            return
        if not self._should_skip_saving_checkpoint(trainer):  # (skipped: this step is saved already)
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if trainer.is_global_zero:
            print(f"stopped by SIGTERM at step {trainer.global_step}: checkpoint {self.last_model_path}; "
                  "run the same command again to continue", flush=True)


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a re-run continues from: the newer of ``checkpoints/last.ckpt`` and the
    checkpoints Lightning writes on SLURM's SIGUSR1 (``hpc_ckpt_<n>.ckpt`` in the run folder)."""
    run_dir = Path(run_dir)
    found = [p for p in [run_dir / "checkpoints" / LAST, *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


class RandomState(L.Callback):
    """Save the torch random generators (CPU and CUDA) with every checkpoint and restore them when
    training resumes, after the sanity check, so that the augmentations draw the same numbers.

    Under DDP the checkpoint holds rank 0's state; the other ranks continue from theirs
    re-seeded from the step (their views are not the uninterrupted run's).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        states = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._pending = checkpoint.get("rng_states")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        states, self._pending = self._pending, None
        if states is None:
            return
        if trainer.global_rank == 0:
            torch.set_rng_state(states["cpu"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])
        else:
            torch.manual_seed(trainer.global_step * 1000 + trainer.global_rank)


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
        half = f"--data.batch_size {batch // 2} --trainer.accumulate_grad_batches {2 * trainer.accumulate_grad_batches}" \
            if batch and batch > 1 else "a smaller --data.batch_size with a larger --trainer.accumulate_grad_batches"
        raise SelfsupError(
            f"out of GPU memory at step {trainer.global_step} with {per_device}: {half} keeps the global batch "
            "(and so the scaled rate); or a smaller backbone or image size"
        ) from exception


def embedding_spread(z: torch.Tensor) -> torch.Tensor:
    """How spread out embeddings (B, D) are: the standard deviation over the batch of the
    L2-normalised vectors, averaged over dimensions and times sqrt(D) (lightly's collapse
    measure, scaled): about 1 for vectors spread over the sphere, 0 when all are one vector."""
    z = torch.nn.functional.normalize(z.detach().float(), dim=1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[1])


class CollapseWatch(L.Callback):
    """Warn once, in words, when the logged ``train/embedding_spread`` falls below ``threshold``
    (every image embedded alike: the contrastive task has nothing left to learn from).

    Args:
        threshold: the spread below which the representation counts as collapsed.
        after_steps: ignore the first steps (a fresh network may start narrow).
    """

    def __init__(self, threshold: float = 0.05, after_steps: int = 10) -> None:
        self.threshold, self.after_steps = threshold, after_steps
        self.warned = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        spread = trainer.callback_metrics.get("train/embedding_spread_step",
                                              trainer.callback_metrics.get("train/embedding_spread"))
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
