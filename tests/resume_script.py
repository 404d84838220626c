"""Run `selfsup fit` (or `selfsup pipeline`) in a process that stops itself at a chosen moment,
as a cluster or a user would stop it: used by tests/system/test_resume.py.

    python tests/resume_script.py KIND:STEP RECORD -- fit ARGS...

KIND: ``none``; ``batch`` (SIGKILL at the start of training step STEP: mid-epoch); ``save`` (SIGKILL
once the checkpoint of step STEP is being written: its contents assembled, the file not yet
there); ``write`` (SIGKILL half-way through writing that checkpoint's bytes); ``usr1`` /
``term`` (SIGUSR1 / SIGTERM to itself at step STEP); ``oom`` (a CUDA out-of-memory error at step
STEP). RECORD gets one line per training step trained by this process: ``<pid> <global step> <the
batch's image rows, comma-separated>``. For ``pipeline``, ``KIND:STEP@STAGE`` stops in that stage
only.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class Stopper(L.Callback):
    def __init__(self, kind: str, step: int, record: Path) -> None:
        self.kind, self.step, self.record, self.sent = kind, step, record, False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step != self.step or self.sent:
            return
        if self.kind == "batch":
            die()
        if self.kind == "oom":  # what a GPU raises when the batch does not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.kind in ("usr1", "term"):
            self.sent = True
            os.kill(os.getpid(), signal.SIGUSR1 if self.kind == "usr1" else signal.SIGTERM)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        rows = ",".join(map(str, batch["index"].tolist())) if "index" in batch else ""
        with self.record.open("a") as f:
            f.write(f"{os.getpid()} {trainer.global_step} {rows}\n")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.global_step != self.step:
            return
        if self.kind == "save":
            die()
        if self.kind == "write":  # Lightning writes through fsspec: die with half the bytes on disk
            from fsspec.implementations.local import LocalFileOpener

            original = LocalFileOpener.write

            def half_then_die(opener, data):  # noqa: ANN001
                original(opener, data[: len(data) // 2])
                opener.flush()
                die()

            LocalFileOpener.write = half_then_die


def main() -> None:
    spec, record = sys.argv[1], Path(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1 :]
    spec, _, only_stage = spec.partition("@")
    kind, _, step = spec.partition(":")
    from selfsup.cli import SelfsupCLI
    from selfsup.cli import main as selfsup_main
    from selfsup.pipeline import Pipeline

    fit_trainer, stage_trainer = SelfsupCLI.instantiate_trainer, Pipeline.trainer

    def fit_with_stopper(cli, **kwargs):  # noqa: ANN001, ANN003
        trainer = fit_trainer(cli, **kwargs)
        trainer.callbacks.append(Stopper(kind, int(step or -1), record))
        return trainer

    def stage_with_stopper(pipeline, stage, *a, **kw):  # noqa: ANN001, ANN002, ANN003
        trainer = stage_trainer(pipeline, stage, *a, **kw)
        trainer.callbacks.append(Stopper(kind if stage == only_stage else "none", int(step or -1), record))
        return trainer

    SelfsupCLI.instantiate_trainer = fit_with_stopper
    Pipeline.trainer = stage_with_stopper
    selfsup_main(args)


if __name__ == "__main__":
    main()
