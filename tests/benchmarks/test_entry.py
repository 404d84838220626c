"""``python -m benchmarks``: every NAME listed and runnable, results stamped with the machine and the commit."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import NAMES
from benchmarks.common import git_commit

from conftest import REPO


def benchmarks(*args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_every_name_with_its_line() -> None:
    names = list(NAMES)
    assert names == [
        "lightly",
        "methods",
        "augment",
        "decode",
        "patches",
        "probe",
        "stream",
        "gpu",
        "speedrun",
        "batch_size",
        "relative_location",
    ]
    p = benchmarks("--help")
    assert p.returncode == 0, p.stderr
    listed = {line.split()[0]: line for line in p.stdout.splitlines() if line.startswith("  ") and line.split()}
    for name in names:
        assert name in listed and len(listed[name].split()) > 3, f"{name} is not listed with a line:\n{p.stdout}"
    assert p.stdout.index("experiments:") > p.stdout.index("  gpu ")  # the experiments apart, after the benchmarks
    # No NAME: the same listing, as a usage error; a wrong NAME: the names to choose from.
    p = benchmarks()
    assert p.returncode == 2 and all(f"  {name} " in p.stdout for name in names)
    p = benchmarks("nonsense")
    assert p.returncode == 2 and "invalid choice: 'nonsense'" in p.stderr and "relative_location" in p.stderr


@pytest.mark.parametrize("name", list(NAMES))
def test_every_benchmark_imports_and_shows_its_options(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (one import of torch for all): the module imports against today's selfsup."""
    module = importlib.import_module(NAMES[name])
    with pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m benchmarks {name} ") and f"python -m benchmarks {name}" in module.__doc__


def test_a_written_result_carries_the_machine_and_the_commit(tmp_path: Path) -> None:
    p = benchmarks(
        "patches", "--image-size", "32", "--batch", "4", "--repeats", "1", "--json", str(tmp_path / "p.json")
    )
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((tmp_path / "p.json").read_text())
    assert list(result)[:2] == ["machine", "commit"]
    machine = result["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["torch"] and "gpu" in machine
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    expected = head.stdout.strip() if head.returncode == 0 else "unknown"
    assert result["commit"]["hash"] == expected and (result["commit"]["dirty"] is None) == (expected == "unknown")
    assert result["sampler_patches_per_s"]["batched"] > 0 and result["args"]["batch"] == 4


def test_the_commit_is_unknown_outside_a_checkout(tmp_path: Path) -> None:
    assert git_commit(tmp_path) == {"hash": "unknown", "dirty": None}
