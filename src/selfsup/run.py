"""One run layer for ``selfsup fit`` and ``selfsup pipeline``: the callbacks every run has, its
loggers, and its folder (the newest checkpoint, the W&B id, whether a folder holds this run).

A run lives in one folder: ``metrics.csv``, ``checkpoints/last.ckpt``, the W&B files, figures,
the bad-file list and a record of its config (``config.yaml`` of ``selfsup fit``, ``stage.json``
of a pipeline stage). Running the same thing again continues it; running something else in it
stops with one line, by one rule (:func:`same_run_or_stop`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ArgumentParser
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.loggers import CSVLogger, Logger

from selfsup import SelfsupError
from selfsup.callbacks import (
    AtomicCheckpointIO,
    CollapseWatch,
    LearningRateScaling,
    LossGuard,
    RandomState,
    RunCheckpoint,
    Warmup,
    newest_checkpoint,
)
from selfsup.tracking import WandbLogger, wandb_run_id

__all__ = [
    "SlurmEnvironment",
    "add_run_arguments",
    "changed_keys",
    "newest_checkpoint",
    "run_callbacks",
    "run_loggers",
    "run_plugins",
    "same_run_or_stop",
]


def add_run_arguments(parser: ArgumentParser, fresh: str) -> None:
    """The run's own sections of a command line: ``checkpoint`` (how often ``last.ckpt`` is
    written) and ``--fresh`` (what starting again means, said by ``fresh``)."""
    parser.add_class_arguments(RunCheckpoint, "checkpoint")
    parser.add_argument("--fresh", type=bool, default=False, help=fresh)


def run_callbacks(
    lr_scaling: LearningRateScaling,
    warmup: Warmup,
    checkpoint: RunCheckpoint | None,
    random_state: bool | None = None,
) -> list[L.Callback]:
    """The callbacks of every selfsup run: the rate scaled by the global batch and warmed up per
    step, a stop at the first non-finite loss, a warning when the representation collapses,
    (with ``checkpoint``) ``last.ckpt``, and the random stream saved with every checkpoint for
    exact resume (``random_state``; None: with ``checkpoint``)."""
    callbacks: list[L.Callback] = [lr_scaling, warmup, LossGuard(), CollapseWatch()]
    if checkpoint is not None:
        callbacks.append(checkpoint)
    if random_state if random_state is not None else checkpoint is not None:
        callbacks.append(RandomState())
    return callbacks


def run_plugins(given: Any = None) -> list[Any]:
    """The Trainer plugins of every selfsup run, after the ``given`` ones: checkpoints written
    atomically on any filesystem (unless a CheckpointIO is given) and, in a SLURM allocation,
    the SLURM environment whose mismatch with the Trainer is one line (unless torchrun runs the
    job inside it, or an environment is given)."""
    plugins = list(given) if isinstance(given, list | tuple) else [given] if given is not None else []
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    environment = any(isinstance(p, ClusterEnvironment) for p in plugins)
    if SlurmEnvironment.detect() and not TorchElasticEnvironment.detect() and not environment:
        # SIGUSR1 is RunCheckpoint's to handle: it saves at the end of the step and then
        # requeues; Lightning's auto-requeue saves from inside the signal handler, mid-step.
        plugins.append(SlurmEnvironment(auto_requeue=False))
    return plugins


def run_loggers(
    folder: str | Path,
    *,
    wandb: bool = True,
    name: str | None = None,
    project: str = "selfsup",
    wandb_dir: str | Path | None = None,
    group: str | None = None,
    job_type: str | None = None,
    offline: bool | None = None,
) -> list[Logger]:
    """A CSV of metrics written directly in the run ``folder`` (its ``metrics.csv``; Lightning's
    ``log_dir``, where config.yaml and figures go) and, with ``wandb``, a W&B run (offline
    without an account) whose id is kept in the folder, so that a resumed run continues it.

    Args:
        name: the W&B run's name (the folder's name by default).
        wandb_dir: where W&B writes its files (the run folder by default).
        group / job_type: W&B's grouping of the stages of one pipeline.
    """
    folder = Path(folder)
    loggers: list[Logger] = [CSVLogger(str(folder), name="", version="")]
    if wandb:
        loggers.append(
            WandbLogger(
                project=project,
                name=name or folder.name,
                save_dir=str(wandb_dir or folder),
                group=group,
                job_type=job_type,
                offline=offline,
                id=wandb_run_id(folder),
                resume="allow",
            )
        )
    return loggers


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """The keys whose values differ between two recorded configs, as ``section.key`` for the
    keys of nested sections (``model.init_args``, ``data.root``) and ``key`` for plain values;
    ``ignore`` names ``section.key``s that change how a run computes, not what it learns."""
    skip = set(ignore)
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) or isinstance(b, Mapping):
            a, b = dict(a or {}), dict(b or {})
            out += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if f"{key}.{k}" not in skip and a.get(k) != b.get(k)]
        elif key not in skip and a != b:
            out.append(key)
    return out


def same_run_or_stop(
    folder: Path, recorded: Mapping[str, Any] | None, current: Mapping[str, Any], fix: str, ignore: Iterable[str] = ()
) -> None:
    """Stop with one line when ``folder`` holds a run whose recorded config differs from this
    one's (continuing it would mix two experiments); ``fix`` says what to do instead."""
    if recorded is None:
        return
    changed = changed_keys(recorded, current, ignore)
    if changed:
        raise SelfsupError(
            f"{folder} holds a run with another config ({', '.join(changed[:4])} "
            f"differ{'s' if len(changed) == 1 else ''}); {fix}"
        )


class SlurmEnvironment(SLURMEnvironment):
    """Lightning's SLURM environment whose check of the allocation against the Trainer is one
    line with the fix: without the check a mismatched job hangs (Lightning #19883)."""

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        try:
            super().validate_settings(num_devices, num_nodes)
        except ValueError as e:
            raise SelfsupError(
                f"{e} Run one task per device: --ntasks-per-node equal to trainer.devices "
                "and --nodes equal to trainer.num_nodes (see scripts/slurm/)."
            ) from None
