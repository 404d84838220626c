"""Run `selfsup fit` (or `selfsup pipeline`) in a process that stops itself at a chosen moment,
as a cluster or a user would stop it: used by tests/system/test_resume.py.

    python tests/resume_script.py KIND:STEP RECORD -- fit ARGS...

KIND: ``none``; ``batch`` (SIGKILL at the start of training step STEP: mid-epoch; under DDP
the whole job is killed, as a scheduler does); ``save`` (SIGKILL
once the checkpoint of step STEP is being written: its contents assembled, the file not yet
there); ``write`` (SIGKILL half-way through writing that checkpoint's bytes); ``usr1`` /
``term`` / ``int`` (SIGUSR1 / SIGTERM / SIGINT to itself at step STEP); ``oom`` (a CUDA
out-of-memory error at step STEP); ``fill`` (fill the run folder's filesystem at step STEP, so that
the next checkpoint finds no space; ``nospace``: the same where no small filesystem can be
mounted, the checkpoint's write failing as a full disk's does); ``slow`` (sleep a second before
every step from STEP on). RECORD gets one line per training step trained by this process:
``<pid> <global step> <the batch's image rows, comma-separated>``. For ``pipeline``,
``KIND:STEP@STAGE`` stops in that stage only.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import sys
import time
from pathlib import Path

import lightning as L
import torch

SIGNALS = {"usr1": signal.SIGUSR1, "term": signal.SIGTERM, "int": signal.SIGINT}


def die() -> None:
    """SIGKILL this process, or under DDP every process of the job (its process group)."""
    sys.stdout.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


class Stopper(L.Callback):
    def __init__(self, kind: str, step: int, record: Path) -> None:
        self.kind, self.step, self.record, self.sent = kind, step, record, False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.kind == "slow" and trainer.global_step >= self.step:
            time.sleep(1.0)
        if trainer.global_step != self.step or self.sent:
            return
        if self.kind == "batch":
            die()
        if self.kind == "oom":  # what a GPU raises when the batch does not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.kind in SIGNALS:
            self.sent = True
            os.kill(os.getpid(), SIGNALS[self.kind])
        if self.kind == "fill":  # a disk that fills up while the run trains
            self.sent = True
            with open(Path(trainer.default_root_dir) / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass

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
        if self.kind == "nospace":
            import selfsup.files

            def full(path, mode="rb"):  # noqa: ANN001, ANN202
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

            selfsup.files.open = full  # type: ignore[attr-defined]
        if self.kind == "write":  # die with half the checkpoint's bytes in the file being written
            import selfsup.files

            class HalfThenDie(io.FileIO):
                def write(self, data) -> int:  # noqa: ANN001
                    written = super().write(memoryview(data)[: len(data) // 2])
                    self.flush()
                    die()
                    return written

            selfsup.files.open = lambda path, mode="rb": HalfThenDie(path, mode.replace("b", ""))  # type: ignore[attr-defined]


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
