"""Runs that survive: checkpoints written often and atomically, and the random stream saved with them.

A resumed run is the same run: weights, optimizer, the rate's callbacks, the online evaluator
and MoCo's queue come back with the checkpoint (Lightning); the data order continues from the
middle of the epoch (``selfsup.data.loaders``); and :class:`RandomState` restores the random
stream the augmentations draw from, so that on the CPU the resumed run ends with the same
weights, bit for bit, as one that never stopped.
"""

from __future__ import annotations

import signal
import threading
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
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
        # The epoch's last batch is saved at the epoch's end, after its validation. A checkpoint
        # from between the two (steps or minutes falling on that batch) resumes with Lightning's
        # epoch counters one behind: the run goes on, but its next checkpoint restarts the epoch.
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Time and step triggers switch Lightning's epoch-end saving off; an epoch end is always
        # a point worth keeping (after its validation, which runs before this hook).
        super().on_train_epoch_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Ctrl-C stops like SIGTERM (after the step in progress, which is saved); the handler
        # gives way to the one before it at once, so that a second Ctrl-C stops immediately.
        _stop["signal"] = signal.SIGTERM
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)

            def interrupted(signum: int, frame: FrameType | None) -> None:
                signal.signal(signal.SIGINT, previous if callable(previous) else signal.default_int_handler)
                _stop["signal"] = signal.SIGINT
                # What Lightning's own SIGTERM handler sets: its loops stop at the next step boundary.
                trainer._signal_connector.received_sigterm = True

            self._previous_sigint = previous
            signal.signal(signal.SIGINT, interrupted)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()

    def _restore_sigint(self) -> None:
        previous = getattr(self, "_previous_sigint", None)
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
            self._previous_sigint = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        # SIGTERM (preemption) or Ctrl-C: Lightning stops after the current step; keep that step.
        if not isinstance(exception, SIGTERMException):
            return
        if not self._should_skip_saving_checkpoint(trainer):  # (skipped: this step is saved already)
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if trainer.is_global_zero:
            by = "Ctrl-C" if stop_signal() == signal.SIGINT else "SIGTERM"
            print(
                f"stopped by {by} at step {trainer.global_step}: checkpoint {self.last_model_path}; "
                "run the same command again to continue",
                flush=True,
            )


#: The signal that stopped this process's run, for its exit status (128 + the signal).
_stop: dict[str, int] = {"signal": signal.SIGTERM}


def stop_signal() -> int:
    """The signal that stopped the run: SIGINT after Ctrl-C, else SIGTERM (Lightning's stop)."""
    return _stop["signal"]


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
    draw the same numbers as in a run that never stopped.

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
            return
        ranks = states.get("ranks") or [states]  # (checkpoints before 0.3 hold rank zero's alone)
        if trainer.global_rank < len(ranks):
            mine = ranks[trainer.global_rank]
            torch.set_rng_state(mine["cpu"])
            if "cuda" in mine and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(mine["cuda"])
        else:
            torch.manual_seed(trainer.global_step * 1000 + trainer.global_rank)
