"""The learning rate as a function of the trainer: scaled by the global batch, warmed up per step.

Trainer facts (devices, nodes, accumulation, steps per epoch) are read from the trainer at run
time, never passed in as model arguments. Each callback records the optimizer's configured
rates at ``on_fit_start``, before Lightning restores a checkpoint's optimizer state, and sets
``lr`` from those stored values; nothing is multiplied in place, so a resumed run continues
the same curve and never scales twice (the pitfall of solo-learn and bolts).
"""

from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from selfsup import SelfsupError
from selfsup.config import NON_NEGATIVE, PROBABILITY, check_ranges
from selfsup.optim.schedules import Decay, ScalingRule, lr_factor, scale_lr
from selfsup.trainer_attrs import callbacks_of, datamodule_of


def _configured_lrs(trainer: L.Trainer) -> list[list[float]]:
    return [[float(g["lr"]) for g in opt.param_groups] for opt in trainer.optimizers]


def per_device_batch_size(trainer: L.Trainer) -> int:
    """Images per training batch on one device, read from the training DataLoader (or the
    DataModule's ``batch_size`` before the loader exists)."""
    loader = trainer.train_dataloader
    bs = getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    dm = datamodule_of(trainer)
    if bs is None and dm is not None:
        bs = getattr(dm, "batch_size", None) or getattr(dm, "hparams", {}).get("batch_size")
    if not bs:
        raise SelfsupError(
            "cannot read the per-device batch size from the training DataLoader; "
            "give it a batch_size (or a batch_sampler with one)"
        )
    return int(bs)


def global_batch_size(trainer: L.Trainer, batch_per_device: int) -> int:
    """Images per optimizer step over the whole job:
    batch per device x devices x nodes x accumulate_grad_batches."""
    return batch_per_device * trainer.world_size * trainer.accumulate_grad_batches


class LearningRateScaling(L.Callback):
    """Set each parameter group's rate to ``rule(global_batch / reference_batch)`` times its
    configured (base) rate, at the start of training, and print one line saying so::

        lr scaling: base_lr=0.3 global_batch=1024 reference=256 rule=linear -> lr=1.2

    The configured ``lr`` of a stage is the rate at ``reference_batch`` images per step
    (Goyal et al. 2017: lr = 0.1 x batch / 256 for ResNet-50 on ImageNet). ``rule``:
    ``linear`` (default), ``sqrt`` (SimCLR and lightly for small batches) or ``none``.
    The effective figures are added to every logger's run config under ``lr_scaling_effective``.

    Args:
        rule: how the rate follows the global batch.
        reference_batch: the global batch at which the configured rate applies.
    """

    def __init__(self, rule: ScalingRule = "linear", reference_batch: int = 256) -> None:
        if reference_batch < 1:
            raise SelfsupError(f"lr_scaling.reference_batch must be positive, got {reference_batch}")
        self.rule = rule
        self.reference_batch = reference_batch
        self.base_lrs: list[list[float]] = []
        self.target_lrs: list[list[float]] = []
        self.global_batch: int | None = None

    def resolve(self, trainer: L.Trainer, base_lr: float, batch_per_device: int) -> tuple[int, float]:
        """(global batch, scaled rate) for ``base_lr`` under ``trainer``; launches nothing."""
        g = global_batch_size(trainer, batch_per_device)
        return g, scale_lr(base_lr, g, self.reference_batch, self.rule)

    def describe(self, base_lr: float, global_batch: int, lr: float) -> str:
        """The line printed at the start of fit (numbers in Python's repr formatting)."""
        return (
            f"lr scaling: base_lr={base_lr!r} global_batch={global_batch!r} "
            f"reference={self.reference_batch!r} rule={self.rule} -> lr={lr!r}"
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before Lightning restores a checkpoint's optimizer state: the configured rates.
        self.base_lrs = _configured_lrs(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the loaders exist and a checkpoint's state is restored.
        batch = per_device_batch_size(trainer)
        self.global_batch = global_batch_size(trainer, batch)
        self.target_lrs = [[self.resolve(trainer, b, batch)[1] for b in bases] for bases in self.base_lrs]
        for opt, targets in zip(trainer.optimizers, self.target_lrs, strict=True):
            for group, lr in zip(opt.param_groups, targets, strict=True):
                group["lr"] = lr
        if not self.base_lrs or not self.base_lrs[0]:
            return
        base, lr = self.base_lrs[0][0], self.target_lrs[0][0]
        if trainer.is_global_zero:
            print(self.describe(base, self.global_batch, lr), flush=True)
        facts = {
            "rule": self.rule,
            "reference_batch": self.reference_batch,
            "batch_per_device": batch,
            "world_size": trainer.world_size,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "global_batch": self.global_batch,
            "base_lr": base,
            "lr": lr,
        }
        for logger in trainer.loggers:
            logger.log_hyperparams({"lr_scaling_effective": facts})


class Warmup(L.Callback):
    """Per-step learning rate: linear warmup from 0 to the target rate, then cosine decay (or
    constant), set before every optimizer step and logged as ``lr``.

    The target is the rate the LearningRateScaling callback computed if the trainer has one,
    else the configured rate. Warmup is counted in optimizer steps (``warmup_epochs`` are
    converted with the trainer's steps per epoch, accumulation included), never per epoch
    (bolts #716), and the step is the trainer's ``global_step``, which a checkpoint restores.
    Goyal et al. (2017) warm up over 5 epochs; SimCLR over 10.

    Args:
        warmup_epochs: warmup length in epochs (may be fractional).
        warmup_steps: warmup length in optimizer steps; overrides ``warmup_epochs``.
        decay: ``cosine`` (to ``final_fraction`` of the target at the last step) or ``constant``.
        final_fraction: the cosine's end value as a fraction of the target.
    """

    def __init__(
        self,
        warmup_epochs: float = 0.0,
        warmup_steps: int | None = None,
        decay: Decay = "cosine",
        final_fraction: float = 0.0,
    ) -> None:
        check_ranges(
            "warmup",
            {
                "warmup_epochs": (warmup_epochs, NON_NEGATIVE),
                "warmup_steps": (warmup_steps, NON_NEGATIVE),
                "final_fraction": (final_fraction, PROBABILITY),
            },
        )
        self.warmup_epochs = warmup_epochs
        self.warmup_steps = warmup_steps
        self.decay = decay
        self.final_fraction = final_fraction
        self.base_lrs: list[list[float]] = []
        self.total_steps: float = math.inf
        self.warmup: int = 0

    @staticmethod
    def steps_per_epoch(trainer: L.Trainer) -> int:
        """Optimizer steps per epoch: Lightning steps after every ``accumulate_grad_batches``
        batches and once more for a partial group at the end of the epoch."""
        return max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.base_lrs = _configured_lrs(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.total_steps = float(trainer.estimated_stepping_batches)
        if self.warmup_steps is not None:
            self.warmup = self.warmup_steps
        else:
            self.warmup = round(self.warmup_epochs * self.steps_per_epoch(trainer))
        if self.decay == "cosine" and not math.isfinite(self.total_steps):
            rank_zero_warn("the run has no step or epoch limit, so the rate stays constant after warmup")
        elif self.warmup >= self.total_steps > 0:
            rank_zero_warn(f"warmup ({self.warmup} steps) lasts the whole run ({self.total_steps:.0f} steps)")

    def targets(self, trainer: L.Trainer) -> list[list[float]]:
        for cb in callbacks_of(trainer):
            if isinstance(cb, LearningRateScaling) and cb.target_lrs:
                return cb.target_lrs
        return self.base_lrs

    def lr_at(self, step: int, target: float) -> float:
        return target * lr_factor(step, self.total_steps, self.warmup, self.decay, self.final_fraction)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        # global_step counts optimizer steps; under accumulation every micro-batch of one
        # step sets the same value.
        step = trainer.global_step
        for opt, targets in zip(trainer.optimizers, self.targets(trainer), strict=True):
            for group, target in zip(opt.param_groups, targets, strict=True):
                group["lr"] = self.lr_at(step, target)
        if trainer.optimizers and trainer.optimizers[0].param_groups:
            pl_module.log("lr", trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=1)
