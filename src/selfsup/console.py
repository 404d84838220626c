"""What a command prints for people: one line per fact, on the first process only unless asked."""

from __future__ import annotations

from lightning.fabric.utilities.rank_zero import rank_zero_only


def say(message: str, every_rank: bool = False) -> None:
    """Print one line for people, on the first process only unless asked
    (the rank is known from the launcher's environment before any process group exists)."""
    rank = getattr(rank_zero_only, "rank", 0)
    if rank == 0:
        print(message, flush=True)
    elif every_rank:
        print(f"[rank {rank}] {message}", flush=True)
