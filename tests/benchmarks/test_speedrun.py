"""``python -m benchmarks speedrun`` end to end at toy size: the curve, its picture, where the time went."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def speedrun(tmp_path: Path, *extra: str) -> dict:
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks", "speedrun", "--toy", "--out", str(tmp_path), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "speedrun: " in p.stdout and "step time: views" in p.stdout
    return json.loads((tmp_path / "curve.json").read_text())


def test_speedrun_logs_knn_against_time_and_stops_at_its_budget_or_target(tmp_path: Path) -> None:
    r = speedrun(tmp_path / "a")
    assert (r["train_images"], r["test_images"]) == (512, 256) and r["epochs"] == 2  # --toy: 2 epochs
    times = [p["seconds"] for p in r["curve"]]
    assert times == sorted(times) and all(0 <= p["knn_top1"] <= 1 for p in r["curve"])
    assert r["best_knn_top1"] == max(p["knn_top1"] for p in r["curve"]) and r["seconds_to_target"] is None
    assert set(r["share_by_phase"]) == {"views", "forward_loss", "backward", "optimizer"}
    assert sum(r["share_by_phase"].values()) == pytest.approx(1.0)
    assert (tmp_path / "a" / "curve.png").stat().st_size > 1000
    assert r["machine"]["cores"] >= 1 and r["commit"]["hash"]
    # A target below chance is met at the first evaluation, and the run stops there.
    r = speedrun(tmp_path / "b", "--target", "0.01", "--eval-every", "0")
    assert r["seconds_to_target"] == r["curve"][0]["seconds"] and len(r["curve"]) == 1 and r["steps"] == 1
