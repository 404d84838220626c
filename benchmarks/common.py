"""What the benchmarks share: where a result came from, how it is written, and how time and memory are measured.

- :func:`machine` and :func:`git_commit` describe the machine and the code; :func:`write_json` stamps every
  result with both, so a figure can always be traced to where and what it measured;
- :func:`parser`: every benchmark's command line (``python -m benchmarks NAME``, its docstring as help);
- :func:`seconds_per_call`, :func:`sync` and :func:`torch_threads`: timing, on CPU or GPU alike;
- :class:`PeakMemory`: the peak resident (and proportional) memory of a process and its children;
- :func:`quiet_trainer`: a Lightning Trainer that writes and prints nothing but the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks import NAMES

#: The checkout that holds this package: configs and sources the benchmarks run.
REPO = Path(__file__).resolve().parents[1]
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


# -- where a result came from ------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """This machine as a result records it: CPU model, cores, torch's threads and version, Python, the GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def git_commit(folder: Path = REPO) -> dict[str, Any]:
    """The commit checked out at ``folder``: its short hash and whether tracked files differ from it
    (untracked files do not count: results written beside the code would make every later run dirty).
    ``{"hash": "unknown", "dirty": None}`` outside a checkout or without git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=folder, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        return {"hash": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "-uno"))}
    except (OSError, subprocess.SubprocessError):
        return {"hash": "unknown", "dirty": None}


def stamp(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with ``machine`` (:func:`machine`, plus what ``result["machine"]`` adds) and ``commit`` first."""
    rest = {k: v for k, v in result.items() if k != "machine"}
    return {"machine": {**machine(), **result.get("machine", {})}, "commit": git_commit(), **rest}


def write_json(path: str | Path | None, result: dict[str, Any]) -> dict[str, Any]:
    """Write ``result``, stamped (:func:`stamp`), as JSON at ``path`` (folders made; None: nowhere); return it."""
    stamped = stamp(result)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(stamped, indent=2) + "\n")
    return stamped


def report(result: dict[str, Any], key: str, value: Any) -> None:
    """Record one figure in ``result`` and print it as ``key: value`` at once (long runs show their progress)."""
    result[key] = value
    print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}", flush=True)


def parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of the benchmark in ``module`` (its ``__name__``), its docstring as the help."""
    name = {m: n for n, m in NAMES.items()}[module]
    return argparse.ArgumentParser(
        prog=f"python -m benchmarks {name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


# -- time ----------------------------------------------------------------------------------------
def sync(device: torch.device | str | None) -> None:
    """Wait for the work queued on a CUDA device: its kernels run after the call that queued them returns."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(
    fn: Callable[[], object],
    repeats: int = 1,
    rounds: int = 1,
    warmup: int = 0,
    device: torch.device | str | None = None,
) -> float:
    """Seconds per call of ``fn``: ``warmup`` untimed calls (compilation, autotuning, first pages), then the
    best of ``rounds`` rounds of ``repeats`` calls, the device synchronized around each. The best round, as
    ``timeit`` takes it, is the one least disturbed by other work on a shared machine."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best / repeats


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block and restored after it (None: as they are)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- memory --------------------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants: the children of any of its threads (loader workers, DDP processes)."""
    pids, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        pids.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                frontier += map(int, (task / "children").read_text().split())
        except (OSError, ValueError):  # it ended meanwhile
            pass
    return pids


def tree_memory(pid: int, pss: bool = False) -> tuple[float, float]:
    """(RSS, PSS) in MB summed over ``pid`` and its descendants. PSS splits shared pages between the
    processes that map them (what DDP processes cost together); it is read only with ``pss`` (from
    ``smaps_rollup``, slower than ``statm``: a watcher thread would slow the benchmark), else 0."""
    rss = pss_mb = 0.0
    for p in process_tree(pid):
        try:
            if not pss:
                rss += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE_MB
                continue
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) / 1024
                elif line.startswith("Pss:"):
                    pss_mb += int(line.split()[1]) / 1024
        except (OSError, ValueError):
            pass
    return rss, pss_mb


class PeakMemory:
    """The peak memory of a process tree (this process by default) while the block runs, sampled by a
    thread every ``interval`` seconds. After the block: ``mb``, the peak RSS above the RSS at its start
    (what the block added); ``peak_rss_mb`` and ``peak_pss_mb`` (with ``pss``), the peaks themselves."""

    def __init__(self, pid: int | None = None, interval: float = 0.02, pss: bool = False) -> None:
        self.pid, self.interval, self.pss = pid or os.getpid(), interval, pss
        self.peak_rss_mb = self.peak_pss_mb = self.mb = 0.0

    def _sample(self) -> None:
        rss, pss = tree_memory(self.pid, self.pss)
        self.peak_rss_mb, self.peak_pss_mb = max(self.peak_rss_mb, rss), max(self.peak_pss_mb, pss)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self.start_rss_mb = tree_memory(self.pid)[0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.mb = max(0.0, self.peak_rss_mb - self.start_rss_mb)


# -- Lightning -----------------------------------------------------------------------------------
def quiet_trainer(**kwargs: Any) -> L.Trainer:
    """A Trainer without logger, checkpoints, progress bar or model summary (``kwargs`` may turn them back
    on): a benchmark keeps nothing of its runs, and prints only its figures."""
    quiet = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return L.Trainer(**{**quiet, **kwargs})
