"""What a command prints for people: one line per fact, on the first process only unless asked.

Plain Python: the models and data layers print through it without importing Lightning."""

from __future__ import annotations

import os
import sys


def process_rank() -> int:
    """This process's rank: Lightning's (which tests and launchers set) once Lightning is loaded,
    else the launcher's environment (torchrun's RANK, SLURM's SLURM_PROCID)."""
    lightning_rank = sys.modules.get("lightning.fabric.utilities.rank_zero")
    if lightning_rank is not None:
        return int(getattr(lightning_rank.rank_zero_only, "rank", 0) or 0)
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def first_process() -> bool:
    """Whether this process is the job's rank zero: the one that prints and writes shared files."""
    return process_rank() == 0


def say(message: str, every_rank: bool = False) -> None:
    """Print one line for people, on the first process only unless asked
    (the rank is known from the launcher's environment before any process group exists)."""
    rank = process_rank()
    if rank == 0:
        print(message, flush=True)
    elif every_rank:
        print(f"[rank {rank}] {message}", flush=True)
