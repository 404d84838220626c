"""Runs that survive: checkpoints written often and atomically, and the random stream saved with them.

A resumed run is the same run: weights, optimizer, the rate's callbacks, the online evaluator
and MoCo's queue come back with the checkpoint (Lightning); the data order continues from the
middle of the epoch (``selfsup.data.loaders``); and :class:`RandomState` restores the random
stream the augmentations draw from, so that on the CPU the resumed run ends with the same
weights, bit for bit, as one that never stopped.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from selfsup import SelfsupError
from selfsup.config import COUNT, POSITIVE, check_ranges
from selfsup.files import write_atomic
from selfsup.models.weights import load_safely

LAST = "last.ckpt"


class RunCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt`` in the run folder, written at every epoch end and every
    ``every_n_steps`` optimizer steps or ``every_minutes`` of training, whichever is given
    (default: at most 10 minutes of work lost). With :class:`AtomicCheckpointIO` (every selfsup
    run's) a kill or a full disk while writing leaves the previous ``last.ckpt`` intact.

    Args:
        every_minutes: save this often during an epoch; None: only at epoch ends (or steps).
        every_n_steps: save every this many optimizer steps instead of by time.
    """

    def __init__(self, every_minutes: float | None = 10.0, every_n_steps: int | None = None) -> None:
        check_ranges(
            "checkpoint", {"every_minutes": (every_minutes, POSITIVE), "every_n_steps": (every_n_steps, COUNT)}
        )
        interval = timedelta(minutes=every_minutes) if every_minutes and every_n_steps is None else None
        self._signalled = 0
        self._previous: dict[int, Any] = {}
        super().__init__(
            filename="last",
            save_top_k=0,
            save_last=True,
            enable_version_counter=False,
            every_n_train_steps=every_n_steps,
            train_time_interval=interval,
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Only a batch that ends an optimizer step (and is not its epoch's last) is a point to
        # save or stop at: between the batches of an accumulated step the summed gradients are
        # in no checkpoint; the epoch's last batch is kept at the epoch's end, after validation
        # (a checkpoint from between the two resumes with Lightning's epoch counters one behind,
        # and the checkpoint the resumed run writes next restarts that epoch).
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if last or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._stop_if_signalled(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Time and step triggers switch Lightning's epoch-end saving off; an epoch end is always
        # a point worth keeping (after its validation, which runs before this hook).
        super().on_train_epoch_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._stop_if_signalled(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # SIGTERM (preemption), Ctrl-C and, in a SLURM job, SIGUSR1 (its warning before the time
        # limit) are noted here and acted on at the next point a checkpoint can be exact: the end
        # of an optimizer step, or of an epoch after its validation. Lightning's own handlers
        # (set after on_fit_start, hence here) stop at once, mid-validation or mid-accumulation.
        # Before training starts there is nothing to save: Lightning's handlers stop the run.
        super().on_train_start(trainer, pl_module)  # (the clock of the time checkpoints)
        self._signalled = 0
        _stop["signal"] = signal.SIGTERM
        if threading.current_thread() is not threading.main_thread():
            return
        signals = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGUSR1] if SLURMEnvironment.detect() else [])
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._received)

    def _received(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:  # a second Ctrl-C stops at once
            previous = self._previous.get(signal.SIGINT)
            signal.signal(signal.SIGINT, previous if callable(previous) else signal.default_int_handler)
        self._signalled = self._signalled or signum

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        """Stop every process together when any of them was signalled: Lightning's loops end at
        the SIGTERM flag, and :meth:`on_exception` saves this step if it is not saved yet."""
        signalled = self._signalled
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([signalled], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signalled = int(flag.item())
        if signalled:
            _stop["signal"] = signalled
            trainer._signal_connector.received_sigterm = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        training = bool(self._previous)
        self._restore_handlers()
        if not isinstance(exception, SIGTERMException) or not training:
            return
        if not self._should_skip_saving_checkpoint(trainer):  # (skipped: this step is saved already)
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if not trainer.is_global_zero:
            return
        by = {int(signal.SIGINT): "Ctrl-C", int(signal.SIGUSR1): "SIGUSR1"}.get(stop_signal(), "SIGTERM")
        then = requeue() if stop_signal() == signal.SIGUSR1 else "run the same command again to continue"
        print(f"stopped by {by} at step {trainer.global_step}: checkpoint {self.last_model_path}; {then}", flush=True)


#: The signal that stopped this process's run, for its exit status (128 + the signal).
_stop: dict[str, int] = {"signal": signal.SIGTERM}


def stop_signal() -> int:
    """The signal that stopped the run: SIGINT after Ctrl-C, SIGUSR1 in SLURM, else SIGTERM."""
    return _stop["signal"]


def requeue() -> str:
    """Put this SLURM job back in the queue (as Lightning's auto-requeue does, but after the
    step's checkpoint is written); what happened, in words."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job):
        return "run the same command again to continue"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"requeueing SLURM job {job} failed ({e}); run the same command again to continue"
    if done.returncode:
        return f"requeueing SLURM job {job} failed ({done.stderr.strip() or done.returncode}); submit it again"
    return f"SLURM job {job} requeued: it continues from there"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomic on any filesystem (:func:`selfsup.files.write_atomic`):
    the checkpoint is written beside its destination, fsynced and renamed over it. Lightning's own
    goes through a temporary file in ``$TMPDIR``, a copy over the old checkpoint whenever the run
    folder is on another filesystem (NFS or Lustre beside a node-local ``$TMPDIR``)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        kept = f"the last good checkpoint is {path}" if path.exists() else "no checkpoint of this run was kept"
        write_atomic(path, lambda f: torch.save(checkpoint, f), what=kept)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # A checkpoint found in the run folder, or given, is read as tensors only: one holding
        # arbitrary objects stops in one line (and nothing in it runs).
        loaded = load_safely(path)
        if not isinstance(loaded, dict):
            raise SelfsupError(f"{path} is not a checkpoint (it holds a {type(loaded).__name__})")
        return loaded


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a re-run continues from: the newer of ``checkpoints/last.ckpt`` and the
    checkpoints Lightning writes on SLURM's SIGUSR1 (``hpc_ckpt_<n>.ckpt`` in the run folder)."""
    run_dir = Path(run_dir)
    found = [p for p in [run_dir / "checkpoints" / LAST, *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


class RandomState(L.Callback):
    """Save the torch random generators (CPU and CUDA) of every rank with every checkpoint and
    restore each rank's when training resumes, after the sanity check, so that the augmentations
    draw the same numbers as in a run that never stopped. A fresh run gives every rank but the
    first a stream of its own (from the seed and the rank).

    Under DDP the ranks' states are gathered into the checkpoint (which rank zero writes); a run
    resumed on another number of processes cannot continue their streams and re-seeds the ranks
    beyond the saved ones from the step (their views are then not an uninterrupted run's).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    @staticmethod
    def _mine() -> dict[str, Any]:
        states: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state_all()
        return states

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Every rank assembles the checkpoint (rank zero writes it): a collective call here.
        mine = self._mine()
        ranks: list[Any] = [mine]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * trainer.world_size
            torch.distributed.all_gather_object(ranks, mine)
        checkpoint["rng_states"] = {**mine, "ranks": ranks}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._pending = checkpoint.get("rng_states")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        states, self._pending = self._pending, None
        if states is None:
            # Every rank was seeded alike (Lightning's seed_everything): without this each would
            # draw the same crops and colours for its own images. Rank zero keeps its stream, so
            # a single process's run is unchanged.
            if trainer.global_rank > 0:
                torch.manual_seed(torch.initial_seed() + 1_000_003 * trainer.global_rank)
            return
        ranks = states.get("ranks") or [states]  # (checkpoints before 0.3 hold rank zero's alone)
        if trainer.global_rank < len(ranks):
            mine = ranks[trainer.global_rank]
            torch.set_rng_state(mine["cpu"])
            if "cuda" in mine and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(mine["cuda"])
        else:
            torch.manual_seed(trainer.global_step * 1000 + trainer.global_rank)
