"""Run `selfsup fit` (or `selfsup pipeline`) in a process that stops itself at a chosen moment,
as a cluster or a user would stop it: used by tests/system/test_resume.py.

    python tests/resume_script.py KIND:STEP RECORD -- fit ARGS...

KIND: ``none``; ``batch`` (SIGKILL at the start of training step STEP: mid-epoch; under DDP
the whole job is killed, as a scheduler does); ``save`` (SIGKILL
once the checkpoint of step STEP is being written: its contents assembled, the file not yet
there); ``write`` (SIGKILL half-way through writing that checkpoint's bytes); ``usr1`` /
``term`` / ``int`` (SIGUSR1 / SIGTERM / SIGINT to itself at step STEP; under DDP to the first
process alone); ``oom`` (a CUDA
out-of-memory error at step STEP); ``fill`` (fill the run folder's filesystem at step STEP, so that
the next checkpoint finds no space; ``nospace``: the same where no small filesystem can be
mounted, the checkpoint's write failing as a full disk's does); ``slow`` (sleep 0.3 s before
every step from STEP on). RECORD gets one line per training step trained by this process:
``<pid> <global step> <the batch's image rows, comma-separated>``. For ``pipeline``,
``KIND:STEP@STAGE`` stops in that stage only.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import io
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.process
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch

from selfsup.cli import SelfsupCLI
from selfsup.cli import main as selfsup_main
from selfsup.pipeline import Pipeline

from reference import free_port

SIGNALS = {"usr1": signal.SIGUSR1, "term": signal.SIGTERM, "int": signal.SIGINT}


def die() -> None:
    """SIGKILL this process, or under DDP every process of its group (the ranks Lightning's
    launcher started; :class:`Job` kills the ranks it started itself)."""
    sys.stdout.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


class Stopper(L.Callback):
    def __init__(self, kind: str, step: int, record: Path) -> None:
        self.kind, self.step, self.record, self.sent = kind, step, record, False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.kind == "slow" and trainer.global_step >= self.step:
            time.sleep(0.3)
        if trainer.global_step != self.step or self.sent:
            return
        if self.kind == "batch":
            die()
        if self.kind == "oom":  # what a GPU raises when the batch does not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.kind in SIGNALS:
            self.sent = True
            if trainer.global_rank == 0:  # (under DDP the first process alone: the others must follow it)
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
    stop_and_run(spec, record, sys.argv[sys.argv.index("--") + 1 :])


def stop_and_run(spec: str, record: Path, args: list[str]) -> None:
    """``selfsup ARGS`` with a :class:`Stopper` in every Trainer it builds."""
    spec, _, only_stage = spec.partition("@")
    kind, _, step = spec.partition(":")

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


def forked(spec: str, record: str, args: list[str], env: dict[str, str], out: str, err: str) -> None:
    """:func:`stop_and_run` in a process forked from a server that imported selfsup once (see
    :func:`start`): a session of its own, ``env`` as its environment, stdout and stderr to the
    files ``out`` and ``err``, its exit status the command's."""
    os.setsid()
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.environ.clear()
    os.environ.update(env)
    # What Lightning reads from the environment when it is imported: this process's rank.
    from lightning.fabric.utilities.rank_zero import _get_rank, rank_zero_only

    rank_zero_only.rank = _get_rank() or 0
    # The platform's way of starting processes (data loader workers), not the fork server's.
    multiprocessing.set_start_method(None, force=True)
    sys.argv = [__file__, spec, record, "--", *args]
    code: object = 0
    try:
        stop_and_run(spec, Path(record), args)
    except SystemExit as e:
        code = e.code
    except BaseException:  # noqa: BLE001 (what the interpreter does with an uncaught one)
        import traceback

        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # a process of multiprocessing skips them; the command's would run
    sys.stdout.flush()
    sys.stderr.flush()
    if not isinstance(code, int):
        print(code, file=sys.stderr, flush=True)
        code = 1 if code is not None else 0
    os._exit(code)


_server: multiprocessing.context.ForkServerContext | None = None


class Job:
    """The processes of one command, one per rank, started by :func:`start`. Like a scheduler
    (srun, torchrun) it kills the others when one is killed."""

    def __init__(self, processes: list[multiprocessing.process.BaseProcess], outputs: list[tuple[Path, Path]]) -> None:
        self.processes, self.outputs = processes, outputs

    @property
    def pid(self) -> int:
        return self.processes[0].pid or 0

    def running(self) -> bool:
        return any(p.exitcode is None for p in self.processes)

    def wait(self, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        """Wait for every rank; the first rank's exit status, every rank's output."""
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            multiprocessing.connection.wait([p.sentinel for p in self.processes if p.exitcode is None], 0.2)
            if any(p.exitcode is not None and p.exitcode < 0 for p in self.processes):
                self.kill()
        timed_out = self.running()
        if timed_out:
            self.kill()
        out, err = ("".join(o[i].read_text() for o in self.outputs) for i in (0, 1))
        if timed_out:
            raise subprocess.TimeoutExpired(args, timeout, out, err)
        return subprocess.CompletedProcess(args, self.processes[0].exitcode, out, err)

    def kill(self) -> None:
        for p in self.processes:
            if p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.join()


def start(spec: str, record: Path, args: list[str], env: dict[str, str], folder: Path, ranks: int = 1) -> Job:
    """Start :func:`stop_and_run` as a process of its own, as ``python tests/resume_script.py``
    would, without the four seconds of importing torch and Lightning each time: forked from
    multiprocessing's fork server, which imported them once and ran nothing (no thread pool to
    inherit). With ``ranks`` > 1 one process per rank, on one machine, as torchrun starts them."""
    global _server
    if _server is None:
        _server = multiprocessing.get_context("forkserver")
        # (Modules of the installed package: before Python 3.12 the server ignores sys.path.)
        _server.set_forkserver_preload(["selfsup.cli", "selfsup.pipeline"])
    port = free_port()
    processes, outputs = [], []
    for rank in range(ranks):
        each = dict(env)
        if ranks > 1 and "SLURM_JOB_ID" in env:  # one task per rank, as srun starts them
            each.update(SLURM_NTASKS=str(ranks), SLURM_NTASKS_PER_NODE=str(ranks), SLURM_PROCID=str(rank))
            each.update(SLURM_LOCALID=str(rank))
        if ranks > 1:
            ddp = {"WORLD_SIZE": ranks, "RANK": rank, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": ranks, "NODE_RANK": 0}
            each.update({k: str(v) for k, v in ddp.items()}, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        (folder / f"rank{rank}").mkdir(parents=True, exist_ok=True)
        out, err = folder / f"rank{rank}" / "stdout", folder / f"rank{rank}" / "stderr"
        process = _server.Process(target=forked, args=(spec, str(record), args, each, str(out), str(err)))
        process.start()
        processes.append(process)
        outputs.append((out, err))
    return Job(processes, outputs)


def run_forked(
    spec: str, record: Path, args: list[str], env: dict[str, str], folder: Path, ranks: int = 1
) -> subprocess.CompletedProcess:
    """:func:`start`, then wait for the job."""
    return start(spec, record, args, env, folder, ranks).wait(args)
